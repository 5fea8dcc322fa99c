//! Thaw's snapshot file format. The capture, chunk codec, keys and atomic writer arrive with
//! the snapshot issue; this crate exists now so the workspace has its final shape.
