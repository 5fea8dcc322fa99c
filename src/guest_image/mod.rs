//! Guest images for Linux: Debian's cloud kernel fetched with apt, and initramfs archives.
