//! The page server's errors: what failed, as structured data, with the kernel's errno or the
//! page source's own error as the cause, never a preformatted string.

use nix::errno::Errno;

/// Any error a page source wants to pass on as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The page server could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// userfaultfd could not be opened (or lacks `UFFD_FEATURE_EVENT_REMOVE`).
    #[error("cannot open userfaultfd")]
    Open(#[source] UffdError),
    /// A region of guest memory could not be registered with userfaultfd.
    #[error("cannot register guest memory at {host_addr:#x} ({len} bytes) with userfaultfd")]
    Register {
        /// The region's host address.
        host_addr: usize,
        /// Its length.
        len: usize,
        /// What the kernel said.
        #[source]
        source: UffdError,
    },
    /// The source's chunk layout is malformed or is not guest memory's.
    #[error("the page source's layout does not fit guest memory")]
    Layout(#[from] LayoutError),
    /// The working set names a chunk the source does not have.
    #[error("working set names chunk {index}; the page source has {chunks}")]
    WorkingSet {
        /// The chunk named.
        index: u32,
        /// Chunks in the source.
        chunks: usize,
    },
    /// The startup set names a chunk the source does not have.
    #[error("startup set names chunk {index}; the page source has {chunks}")]
    StartupSet {
        /// The chunk named.
        index: u32,
        /// Chunks in the source.
        chunks: usize,
    },
    /// The source could not deliver a chunk (for a sealed snapshot: it failed to authenticate
    /// or to be read); none of its bytes reached guest memory.
    #[error("chunk {index} could not be read")]
    Chunk {
        /// The chunk.
        index: usize,
        /// Why.
        #[source]
        source: SourceError,
    },
    /// A chunk index past the source's chunks reached an installer.
    #[error("chunk {index} does not exist; the page source has {chunks}")]
    NoSuchChunk {
        /// The chunk named.
        index: usize,
        /// Chunks in the source.
        chunks: usize,
    },
    /// A chunk's buffer is not the chunk's length.
    #[error("chunk {index}'s buffer holds {found} bytes, not its {expected}")]
    ChunkLength {
        /// The chunk.
        index: usize,
        /// The chunk's length.
        expected: usize,
        /// The buffer's.
        found: usize,
    },
    /// Installing a chunk's pages failed.
    #[error("installing chunk {index} failed: {op} of {len} bytes at {host_addr:#x}")]
    Install {
        /// The chunk.
        index: usize,
        /// The ioctl.
        op: InstallOp,
        /// Where it copied to.
        host_addr: usize,
        /// How much.
        len: usize,
        /// What the kernel said.
        #[source]
        source: UffdError,
    },
    /// A fault outside every registered region.
    #[error("page fault at {addr:#x}, outside guest memory")]
    StrayFault {
        /// Host address.
        addr: usize,
    },
    /// Reading userfaultfd events failed.
    #[error("reading userfaultfd events failed")]
    Events(#[source] UffdError),
    /// A server thread panicked.
    #[error("page server thread {thread} panicked: {message}")]
    Panic {
        /// The thread's name.
        thread: &'static str,
        /// The panic's message, if it had one.
        message: String,
    },
    /// A server thread could not start.
    #[error("cannot start the page server's threads")]
    Thread(#[source] std::io::Error),
    /// The final accounting: a full pass over every chunk ended with chunks not installed.
    #[error(
        "{missing} of {chunks} chunks were never installed and {installing} are still being \
         installed after a full pass (the first is chunk {first})"
    )]
    Incomplete {
        /// Chunks in the source.
        chunks: usize,
        /// Chunks nobody claimed.
        missing: usize,
        /// Chunks claimed but not finished.
        installing: usize,
        /// The first chunk not installed.
        first: usize,
    },
    /// The final accounting: every chunk is installed but the counts do not add up.
    #[error("the final accounting does not add up: {tally} come to {counted}, expected {expected}")]
    Unaccounted {
        /// Which sum.
        tally: Tally,
        /// What it came to.
        counted: u64,
        /// What it should be.
        expected: u64,
    },
}

impl PagerError {
    /// The error and every cause below it, joined with `": "`: for callers that keep a
    /// failure as text.
    pub fn full_message(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

/// The userfaultfd ioctl that installs pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallOp {
    /// `UFFDIO_COPY`: the chunk's bytes.
    Copy,
    /// `UFFDIO_ZEROPAGE`: zeros (an elided chunk, or a discarded page).
    ZeroPage,
}

impl std::fmt::Display for InstallOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InstallOp::Copy => "UFFDIO_COPY",
            InstallOp::ZeroPage => "UFFDIO_ZEROPAGE",
        })
    }
}

/// What a userfaultfd operation reported: the `userfaultfd` crate's error with its errno
/// carried as this crate's [`Errno`].
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The system call failed with this errno.
    #[error(transparent)]
    Errno(#[from] Errno),
    /// `/dev/userfaultfd` exists but could not be opened.
    #[error("cannot open /dev/userfaultfd")]
    Device(#[source] std::io::Error),
    /// The kernel lacks an ioctl the server needs.
    #[error("the kernel's userfaultfd lacks needed ioctls (it offers {supported:#x})")]
    MissingIoctls {
        /// The ioctls it offers (a bit set).
        supported: u64,
    },
    /// A copy stopped short without an errno.
    #[error("the kernel copied {copied} bytes and stopped")]
    Partial {
        /// Bytes copied.
        copied: usize,
    },
    /// A read returned part of an event.
    #[error("read {read} of a userfaultfd event's {expected} bytes")]
    ShortEvent {
        /// Bytes read.
        read: usize,
        /// Bytes in an event.
        expected: usize,
    },
    /// The descriptor reported end of file.
    #[error("userfaultfd reported end of file")]
    Eof,
    /// An event the crate does not know.
    #[error("unknown userfaultfd event {0}")]
    UnknownEvent(u8),
}

impl UffdError {
    /// The errno, if the kernel gave one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            UffdError::Errno(e) => Some(*e),
            UffdError::Device(e) => e.raw_os_error().map(Errno::from_raw),
            _ => None,
        }
    }
}

impl From<userfaultfd::Error> for UffdError {
    fn from(e: userfaultfd::Error) -> Self {
        use userfaultfd::Error as E;
        // The crate's `Errno` is an older nix's; the raw value is the same errno.
        match e {
            E::CopyFailed(errno) | E::ZeropageFailed(errno) | E::SystemError(errno) => {
                UffdError::Errno(Errno::from_raw(errno as i32))
            }
            E::PartiallyCopied(copied) => UffdError::Partial { copied },
            E::IncompleteMsg { read, expected } => UffdError::ShortEvent { read, expected },
            E::ReadEof => UffdError::Eof,
            E::UnrecognizedEvent(code) => UffdError::UnknownEvent(code),
            E::UnsupportedIoctls(supported) => UffdError::MissingIoctls {
                supported: supported.bits(),
            },
            E::OpenDevUserfaultfd(io) => UffdError::Device(io),
        }
    }
}

/// Why a page source could not deliver a chunk.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The bytes failed authentication: they are not the snapshot's (tampered, swapped, from
    /// another snapshot). Never retried.
    #[error("its bytes failed authentication")]
    Unauthentic(#[source] BoxError),
    /// The bytes could not be fetched or decoded (I/O, a network store, a corrupt encoding).
    #[error("its bytes could not be fetched")]
    Unavailable(#[source] BoxError),
}

/// A chunk layout that is malformed, or that guest memory does not match.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Guest memory's regions are not the source's.
    #[error("the page source has regions {described:x?}; guest memory has {given:x?}")]
    Regions {
        /// The source's (guest address, length) pairs.
        described: Vec<(u64, u64)>,
        /// Guest memory's.
        given: Vec<(u64, u64)>,
    },
    /// The chunk size is zero or not a whole number of pages.
    #[error("chunk size {chunk_size} is not a positive multiple of 4 KiB")]
    ChunkSize {
        /// The chunk size.
        chunk_size: usize,
    },
    /// A region is not a whole number of pages, or ends past the address space.
    #[error("region at {guest_addr:#x} of {len} bytes is not whole pages of the address space")]
    Region {
        /// Its guest address.
        guest_addr: u64,
        /// Its length.
        len: u64,
    },
    /// A chunk is not where cutting its region into chunk-size pieces puts it.
    #[error(
        "chunk {index} ({len} bytes at {guest_addr:#x}) is not where its region's layout puts \
         it ({expected_len} bytes at {expected_addr:#x})"
    )]
    ChunkMisplaced {
        /// The chunk.
        index: usize,
        /// Where the source says it is.
        guest_addr: u64,
        /// Its length by the source.
        len: usize,
        /// Where it should be.
        expected_addr: u64,
        /// Its length by the layout.
        expected_len: usize,
    },
    /// The source lists more or fewer chunks than its regions hold.
    #[error("the page source lists {chunks} chunks; its regions hold {expected}")]
    ChunkCount {
        /// Chunks listed.
        chunks: usize,
        /// Chunks the regions hold.
        expected: usize,
    },
}

/// A sum the final accounting checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tally {
    /// Chunks installed for faults, from the startup set, from the working set and by the
    /// prefetch: every chunk.
    ChunksByInstaller,
    /// Data and zero chunks: every chunk.
    ChunksByKind,
    /// Pages installed and pages skipped as removed: every page.
    Pages,
    /// Pages skipped as removed: at most the pages removed.
    SkippedPages,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tally::ChunksByInstaller => {
                "chunks installed by faults, startup set, working set and prefetch"
            }
            Tally::ChunksByKind => "data and zero chunks installed",
            Tally::Pages => "pages installed or skipped as removed",
            Tally::SkippedPages => "pages skipped as removed (at most the removed pages)",
        })
    }
}
