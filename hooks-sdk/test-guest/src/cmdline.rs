//! The kernel command line: the guest's `thaw.*` options and the `virtio_mmio.device=` words
//! the VMM appends for each virtio-mmio device (Linux's format, `<size>@<base>:<irq>[:<id>]`).

use hooks_sdk::protocol::InitType;

/// Most virtio-mmio devices the guest keeps track of.
pub const MAX_DEVICES: usize = 8;
/// Most memory `thaw.fill-mib` may ask for (Lambda's largest function has 10 GiB).
pub const MAX_FILL_MIB: u32 = 10 * 1024;
/// Longest `thaw.restore-hook-ms` (10 minutes: far beyond any host's hook budget).
pub const MAX_RESTORE_HOOK_MS: u32 = 600_000;

/// One virtio-mmio device from the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of its register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupt line (unused: the guest polls).
    pub irq: u32,
}

/// What the guest does after its CPU checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only the CPU checks, then exit.
    Checks,
    /// The Thaw agent over vsock (`thaw.agent=1`).
    Agent,
    /// The vsock bench responder (`thaw.vsock-bench=1`).
    Bench,
    /// Send the device bad input, then serve as the agent (`thaw.vsock-misbehave=KIND`).
    Misbehave(Misbehavior),
    /// Say so on the console and keep counting at CPL3 until the host stops the VM
    /// (`thaw.idle=1`): a guest to snapshot when a console line appears.
    Idle,
    /// Read, write and check every virtio-block disk, print what was found, then exit
    /// (`thaw.disk-test=1`).
    DiskTest,
}

/// Kinds of deliberately bad input for the vsock device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehavior {
    /// Descriptors pointing outside guest memory (`bad-addr`).
    BadAddr,
    /// Header lengths beyond the buffer, a short header (`bad-len`).
    BadLen,
    /// Unknown operations and socket types (`bad-op`).
    BadOp,
    /// Packets for connections that do not exist (`no-conn`).
    NoConn,
    /// A flood of connection requests (`flood`).
    Flood,
    /// All of the above, in that order (`all`).
    All,
}

impl Misbehavior {
    /// Every single kind, in the order `All` runs them.
    pub const EACH: [Misbehavior; 5] = [
        Misbehavior::BadAddr,
        Misbehavior::BadLen,
        Misbehavior::BadOp,
        Misbehavior::NoConn,
        Misbehavior::Flood,
    ];

    /// The kind named `name` on the command line.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "bad-addr" => Misbehavior::BadAddr,
            "bad-len" => Misbehavior::BadLen,
            "bad-op" => Misbehavior::BadOp,
            "no-conn" => Misbehavior::NoConn,
            "flood" => Misbehavior::Flood,
            "all" => Misbehavior::All,
            _ => return None,
        })
    }

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Misbehavior::BadAddr => "bad-addr",
            Misbehavior::BadLen => "bad-len",
            Misbehavior::BadOp => "bad-op",
            Misbehavior::NoConn => "no-conn",
            Misbehavior::Flood => "flood",
            Misbehavior::All => "all",
        }
    }
}

/// A failure the agent fakes on purpose (`thaw.fail=WHAT`), so the host's handling of each
/// runtime failure can be tested.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fail {
    /// Nothing fails.
    #[default]
    Nothing,
    /// Init fails: the agent sends `InitError` instead of `Ready` / waiting (`init`).
    Init,
    /// The runtime dies during init: the guest exits with status 1 (`exit`).
    Exit,
    /// The before-checkpoint hook fails (`checkpoint`).
    Checkpoint,
    /// The after-restore hook fails (`restore`).
    Restore,
}

impl Fail {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "init" => Fail::Init,
            "exit" => Fail::Exit,
            "checkpoint" => Fail::Checkpoint,
            "restore" => Fail::Restore,
            _ => return None,
        })
    }
}

/// Everything the command line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// `thaw.exit`: status when all checks pass.
    pub exit_code: u8,
    /// What to do.
    pub mode: Mode,
    /// `thaw.init`: what the agent's Hello says.
    pub init_type: InitType,
    /// virtio-mmio devices, `device_count` of them valid.
    pub devices: [MmioDevice; MAX_DEVICES],
    /// How many of `devices` are valid.
    pub device_count: usize,
    /// `thaw.fill-mib`: MiB of memory to fill with the workload before the mode starts.
    pub fill_mib: u32,
    /// `thaw.restore-read-mib`: MiB of the workload the after-restore hook reads (from its
    /// start); `None`: all of it.
    pub restore_read_mib: Option<u32>,
    /// `thaw.fail`: what the agent fails on purpose.
    pub fail: Fail,
    /// `thaw.keeper`: cpu1 runs the register keeper instead of halting.
    pub keeper: bool,
    /// `thaw.restore-hook-ms`: how long the after-restore hook busy-waits before it finishes.
    pub restore_hook_ms: u32,
    /// `thaw.quiet`: after the command line is read, print only failures.
    pub quiet: bool,
}

impl Options {
    /// The virtio-mmio devices found.
    pub fn devices(&self) -> &[MmioDevice] {
        &self.devices[..self.device_count]
    }
}

/// Parses a number: `0x` hex or decimal.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a size as Linux's `memparse` does: a number with an optional K, M or G suffix.
fn size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    number(digits)?.checked_mul(1 << shift)
}

/// Parses `<size>@<base>:<irq>[:<id>]`.
pub fn parse_mmio_device(spec: &str) -> Option<MmioDevice> {
    let (size_part, rest) = spec.split_once('@')?;
    let (base_part, rest) = rest.split_once(':')?;
    let irq_part = rest.split_once(':').map_or(rest, |(irq, _id)| irq);
    let device = MmioDevice {
        size: size(size_part)?,
        base: number(base_part)?,
        irq: irq_part.parse().ok()?,
    };
    (device.size > 0).then_some(device)
}

fn flag(value: &str) -> Option<bool> {
    match value {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Parses the command line; on error returns the offending word.
pub fn parse(cmdline: &str) -> Result<Options, &str> {
    let mut o = Options {
        exit_code: 0,
        mode: Mode::Checks,
        init_type: InitType::OnDemand,
        devices: [MmioDevice::default(); MAX_DEVICES],
        device_count: 0,
        fill_mib: 0,
        restore_read_mib: None,
        fail: Fail::Nothing,
        keeper: false,
        restore_hook_ms: 0,
        quiet: false,
    };
    for word in cmdline.split_ascii_whitespace() {
        if let Some(spec) = word.strip_prefix("virtio_mmio.device=") {
            let device = parse_mmio_device(spec).ok_or(word)?;
            if o.device_count == MAX_DEVICES {
                return Err(word);
            }
            o.devices[o.device_count] = device;
            o.device_count += 1;
            continue;
        }
        let Some(setting) = word.strip_prefix("thaw.") else {
            continue; // options for other programs (console=, ...) are not ours
        };
        let mode = match setting.split_once('=') {
            Some(("exit", value)) => {
                o.exit_code = value.parse().map_err(|_| word)?;
                None
            }
            Some(("init", "on-demand")) => {
                o.init_type = InitType::OnDemand;
                None
            }
            Some(("init", "snap-start")) => {
                o.init_type = InitType::SnapStart;
                None
            }
            Some(("agent", value)) => flag(value).ok_or(word)?.then_some(Mode::Agent),
            Some(("vsock-bench", value)) => flag(value).ok_or(word)?.then_some(Mode::Bench),
            Some(("idle", value)) => flag(value).ok_or(word)?.then_some(Mode::Idle),
            Some(("disk-test", value)) => flag(value).ok_or(word)?.then_some(Mode::DiskTest),
            Some(("fail", what)) => {
                o.fail = Fail::from_name(what).ok_or(word)?;
                None
            }
            Some(("fill-mib", value)) => {
                o.fill_mib = value
                    .parse()
                    .ok()
                    .filter(|n| *n <= MAX_FILL_MIB)
                    .ok_or(word)?;
                None
            }
            Some(("restore-read-mib", value)) => {
                o.restore_read_mib = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|n| *n <= MAX_FILL_MIB)
                        .ok_or(word)?,
                );
                None
            }
            Some(("keeper", value)) => {
                o.keeper = flag(value).ok_or(word)?;
                None
            }
            Some(("quiet", value)) => {
                o.quiet = flag(value).ok_or(word)?;
                None
            }
            Some(("restore-hook-ms", value)) => {
                o.restore_hook_ms = value
                    .parse()
                    .ok()
                    .filter(|n| *n <= MAX_RESTORE_HOOK_MS)
                    .ok_or(word)?;
                None
            }
            Some(("vsock-misbehave", kind)) => {
                Some(Mode::Misbehave(Misbehavior::from_name(kind).ok_or(word)?))
            }
            _ => return Err(word),
        };
        if let Some(mode) = mode {
            if o.mode != Mode::Checks && o.mode != mode {
                return Err(word); // two different modes
            }
            o.mode = mode;
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_plain_options() {
        let o = parse("console=ttyS0 reboot=k").unwrap();
        assert_eq!((o.exit_code, o.mode, o.device_count), (0, Mode::Checks, 0));
        assert_eq!(o.init_type, InitType::OnDemand);
        let o = parse("thaw.exit=42 thaw.agent=1 thaw.init=snap-start").unwrap();
        assert_eq!((o.exit_code, o.mode), (42, Mode::Agent));
        assert_eq!(o.init_type, InitType::SnapStart);
        assert_eq!(parse("thaw.agent=0").unwrap().mode, Mode::Checks);
        assert_eq!(parse("thaw.vsock-bench=1").unwrap().mode, Mode::Bench);
        let o = parse("thaw.idle=1 thaw.fill-mib=256").unwrap();
        assert_eq!((o.mode, o.fill_mib), (Mode::Idle, 256));
        assert_eq!(parse("thaw.agent=1").unwrap().fill_mib, 0);
        let o = parse("thaw.agent=1 thaw.fill-mib=64 thaw.restore-read-mib=16").unwrap();
        assert_eq!((o.fill_mib, o.restore_read_mib), (64, Some(16)));
        assert_eq!(parse("thaw.agent=1").unwrap().restore_read_mib, None);
        assert!(parse("thaw.restore-read-mib=x").is_err());
        assert_eq!(parse("thaw.agent=1").unwrap().fail, Fail::Nothing);
        for (name, fail) in [
            ("init", Fail::Init),
            ("exit", Fail::Exit),
            ("checkpoint", Fail::Checkpoint),
            ("restore", Fail::Restore),
        ] {
            assert_eq!(parse(&format!("thaw.fail={name}")).unwrap().fail, fail);
        }
        let o = parse("thaw.agent=1").unwrap();
        assert_eq!((o.keeper, o.restore_hook_ms), (false, 0));
        let o = parse("thaw.agent=1 thaw.keeper=1 thaw.restore-hook-ms=1500").unwrap();
        assert_eq!(
            (o.mode, o.keeper, o.restore_hook_ms),
            (Mode::Agent, true, 1500)
        );
        assert!(!parse("thaw.keeper=1 thaw.keeper=0").unwrap().keeper);
        assert!(parse("thaw.agent=1 thaw.quiet=1").unwrap().quiet);
        assert!(!parse("thaw.agent=1").unwrap().quiet);
        assert_eq!(parse("thaw.quiet=2"), Err("thaw.quiet=2"));
        assert!(parse("thaw.idle=1 thaw.keeper=1").unwrap().keeper);
        let o = parse("thaw.disk-test=1 thaw.exit=7 virtio_mmio.device=4K@0xd0000000:5").unwrap();
        assert_eq!(
            (o.mode, o.exit_code, o.device_count),
            (Mode::DiskTest, 7, 1)
        );
        assert_eq!(parse("thaw.disk-test=0").unwrap().mode, Mode::Checks);
        let o = parse("thaw.vsock-misbehave=flood").unwrap();
        assert_eq!(o.mode, Mode::Misbehave(Misbehavior::Flood));
        for m in Misbehavior::EACH.iter().chain([&Misbehavior::All]) {
            assert_eq!(Misbehavior::from_name(m.name()), Some(*m));
        }
    }

    #[test]
    fn bad_options_name_the_word() {
        assert_eq!(parse("thaw.exit=300"), Err("thaw.exit=300"));
        assert_eq!(parse("thaw.nope=1"), Err("thaw.nope=1"));
        assert_eq!(parse("thaw.agent=yes"), Err("thaw.agent=yes"));
        assert_eq!(parse("thaw.init=lazy"), Err("thaw.init=lazy"));
        assert_eq!(parse("thaw.fill-mib=-1"), Err("thaw.fill-mib=-1"));
        assert_eq!(parse("thaw.fail=sometimes"), Err("thaw.fail=sometimes"));
        assert_eq!(parse("thaw.fill-mib=10241"), Err("thaw.fill-mib=10241"));
        assert_eq!(parse("thaw.keeper=yes"), Err("thaw.keeper=yes"));
        assert_eq!(parse("thaw.keeper"), Err("thaw.keeper"));
        assert_eq!(
            parse("thaw.restore-hook-ms=600001"),
            Err("thaw.restore-hook-ms=600001")
        );
        assert_eq!(
            parse("thaw.restore-hook-ms=1.5"),
            Err("thaw.restore-hook-ms=1.5")
        );
        assert_eq!(
            parse("thaw.restore-hook-ms=600000")
                .unwrap()
                .restore_hook_ms,
            600_000
        );
        assert_eq!(parse("thaw.idle=1 thaw.agent=1"), Err("thaw.agent=1"));
        assert_eq!(parse("thaw.disk-test=yes"), Err("thaw.disk-test=yes"));
        assert_eq!(parse("thaw.disk-test=1 thaw.agent=1"), Err("thaw.agent=1"));
        assert_eq!(
            parse("thaw.vsock-bench=1 thaw.disk-test=1"),
            Err("thaw.disk-test=1")
        );
        assert_eq!(
            parse("thaw.vsock-misbehave=x"),
            Err("thaw.vsock-misbehave=x")
        );
        assert_eq!(
            parse("thaw.agent=1 thaw.vsock-bench=1"),
            Err("thaw.vsock-bench=1")
        );
        assert_eq!(
            parse("thaw.agent=1 thaw.agent=1").unwrap().mode,
            Mode::Agent
        );
    }

    #[test]
    fn virtio_mmio_devices() {
        let o = parse(
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=0x1000@0xd0001000:6:1 virtio_mmio.device=8192@3489669120:7",
        )
        .unwrap();
        assert_eq!(
            o.devices(),
            &[
                MmioDevice {
                    base: 0xd000_0000,
                    size: 4096,
                    irq: 5
                },
                MmioDevice {
                    base: 0xd000_1000,
                    size: 4096,
                    irq: 6
                },
                MmioDevice {
                    base: 0xd000_2000,
                    size: 8192,
                    irq: 7
                },
            ]
        );
        assert_eq!(parse_mmio_device("1M@0x0:0").unwrap().size, 1 << 20);
        assert_eq!(parse_mmio_device("1g@0x0:0").unwrap().size, 1 << 30);
        for bad in [
            "",
            "4K",
            "4K@",
            "4K@0xd0000000",
            "4K@0xzz:5",
            "4Q@0x0:5",
            "0@0x0:5",
            "4K@0x0:-1",
            "99999999999999999999G@0:1",
            "K@0:1",
        ] {
            assert_eq!(parse_mmio_device(bad), None, "{bad}");
        }
        let word = "virtio_mmio.device=4K@0xd0000000";
        assert_eq!(parse(word), Err(word));
        let many = "virtio_mmio.device=4K@0x0:1 ".repeat(MAX_DEVICES + 1);
        assert!(parse(&many).is_err());
    }
}
