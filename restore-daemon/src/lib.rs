//! Thaw's restore path, the userfaultfd page server and `thawd`. So far: the page server
//! (`pager`), which lazy restore builds on; restore itself and the daemon follow.

pub mod pager;
