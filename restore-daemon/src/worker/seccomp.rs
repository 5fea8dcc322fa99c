//! The jailed worker's syscall filter: the syscalls a worker makes once it serves requests
//! (restores, the page server, vCPUs, the agent's socket, invocations, freezes, shutdown) and
//! nothing else. Any other syscall kills the whole worker with `SIGSYS`
//! (`SECCOMP_RET_KILL_PROCESS`): a worker that tries something it never does is no longer
//! trusted to go on.
//!
//! How the list was found (docs/security.md has the procedure): every worker of the thawd and
//! worker integration tests (shared, lazy and eager restores, prepared restores, freezes,
//! thaws, timeouts, crashes, shutdowns) was traced with `strace -f`, and the syscalls made after
//! its `execve` were collected; the few a Rust program makes on paths those runs do not take
//! (a panic's abort, glibc's fallback from `clone3` to `clone`, the vDSO's fallbacks) were
//! added, and the four calls that read the process's own ids. `socket` is allowed for Unix
//! sockets only and `prctl` only to name threads.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Allowed with any arguments.
const ALLOWED: &[(i64, &str)] = &[
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_close, "close"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_fstatfs, "fstatfs"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_getegid, "getegid"),
    (libc::SYS_geteuid, "geteuid"),
    (libc::SYS_getgid, "getgid"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_getppid, "getppid"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_getuid, "getuid"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_read, "read"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_sched_setscheduler, "sched_setscheduler"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_set_robust_list, "set_robust_list"),
    (libc::SYS_set_tid_address, "set_tid_address"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_timerfd_settime, "timerfd_settime"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_write, "write"),
    (libc::SYS_writev, "writev"),
];

/// The filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the worker's syscall filter")]
pub struct SeccompError(#[source] pub seccompiler::Error);

/// The syscalls allowed, by name (for docs and tests).
pub fn allowed_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = ALLOWED.iter().map(|&(_, name)| name).collect();
    names.extend(["socket (AF_UNIX only)", "prctl (PR_SET_NAME only)"]);
    names.sort_unstable();
    names
}

/// The filter as a BPF program.
pub fn program() -> Result<BpfProgram, SeccompError> {
    let only = |arg: u8, value: u64| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        let condition =
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
        Ok(vec![SeccompRule::new(vec![condition])?])
    };
    let build = || -> Result<BpfProgram, seccompiler::BackendError> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            ALLOWED.iter().map(|&(nr, _)| (nr, Vec::new())).collect();
        rules.insert(libc::SYS_socket, only(0, libc::AF_UNIX as u64)?);
        rules.insert(libc::SYS_prctl, only(0, libc::PR_SET_NAME as u64)?);
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )?;
        BpfProgram::try_from(filter)
    };
    build().map_err(|e| SeccompError(seccompiler::Error::Backend(e)))
}

/// Installs the filter on every thread of this process (`SECCOMP_FILTER_FLAG_TSYNC`); threads
/// started later inherit it. Needs `no_new_privs` (set by the jail) or `CAP_SYS_ADMIN`.
pub fn install() -> Result<(), SeccompError> {
    let program = program()?;
    seccompiler::apply_filter_all_threads(&program).map_err(SeccompError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds_and_names_what_it_allows() {
        let program = program().unwrap();
        assert!(
            program.len() > ALLOWED.len(),
            "{} instructions",
            program.len()
        );
        let names = allowed_names();
        assert!(names.contains(&"ioctl"));
        for forbidden in ["execve", "ptrace", "mount", "unshare", "kill", "socket"] {
            assert!(!names.contains(&forbidden), "{forbidden}");
        }
    }

    /// A forbidden syscall kills the process with SIGSYS, and an allowed one works: tried in a
    /// forked child, so the test process keeps no filter.
    #[test]
    fn a_forbidden_syscall_kills_the_process_with_sigsys() {
        use nix::sys::wait::{WaitStatus, waitpid};
        use nix::unistd::{ForkResult, fork};
        let program = program().unwrap();
        // SAFETY: the child only makes raw syscalls and `_exit`s; it never returns into the
        // test harness, allocates or takes a lock another thread may hold.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                // SAFETY: plain syscalls on no memory of ours but `program`, then `_exit`.
                unsafe {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    let fprog = libc::sock_fprog {
                        len: program.len() as u16,
                        filter: program.as_ptr() as *mut libc::sock_filter,
                    };
                    if libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        &fprog as *const libc::sock_fprog,
                    ) != 0
                    {
                        libc::_exit(2);
                    }
                    if libc::getpid() <= 0 {
                        libc::_exit(3);
                    }
                    libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
                    libc::_exit(4);
                }
            }
            ForkResult::Parent { child } => {
                let status = waitpid(child, None).unwrap();
                assert!(
                    matches!(
                        status,
                        WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
                    ),
                    "the child was not killed by SIGSYS: {status:?}"
                );
            }
        }
    }
}
