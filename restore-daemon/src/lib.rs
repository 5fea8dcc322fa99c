//! Thaw's restore path, the userfaultfd page server and `thawd`. They arrive with the restore
//! and daemon issues; this crate exists now so the workspace has its final shape.
