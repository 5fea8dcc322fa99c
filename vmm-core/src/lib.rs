//! Thaw VMM core.
