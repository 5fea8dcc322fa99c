//! Lambda's Invoke API over HTTP (to be written).
