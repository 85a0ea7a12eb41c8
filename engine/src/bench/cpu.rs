//! The CPU time a run's measured part (first accept to last `sent`) cost per notification: this
//! process (the engine, the sinks and the load generator), the bench's own nats-server, and the
//! whole machine (a PostgreSQL server and anything else running included).
//!
//! On a shared virtual machine throughput follows the host's load (this project's machine drifts
//! by 1.5× within an hour); the CPU one notification costs drifts much less, so it is the number
//! to compare two builds by. Read from Linux's `/proc`, in clock ticks (10 ms on most kernels):
//! runs of a few seconds or more are precise to about 1%.

use serde::Serialize;

/// CPU counters at one moment, in clock ticks; each is absent where `/proc` could not be read.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    process: Option<u64>,
    nats_server: Option<u64>,
    machine: Option<MachineTicks>,
}

/// The machine's counters (all cores), from the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MachineTicks {
    /// Ticks spent running anything: user, nice, system, irq and softirq.
    busy: u64,
    /// Ticks the hypervisor gave to other guests while this one had work.
    steal: u64,
    /// Every tick: busy, idle, iowait and steal.
    total: u64,
}

/// CPU of a run's measured part.
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    /// Microseconds of CPU this process spent per notification: the engine, the sinks and the
    /// load generator.
    pub process_us: Option<f64>,
    /// Microseconds the bench's own nats-server spent per notification (absent with `--nats-url`).
    pub nats_server_us: Option<f64>,
    /// Microseconds the machine's cores spent per notification, everything on it included.
    pub machine_us: Option<f64>,
    /// Share of the machine's CPU capacity that was busy (1.0: every core, all the time).
    pub machine_busy: Option<f64>,
    /// Share of the machine's CPU capacity the hypervisor took for other guests.
    pub machine_steal: Option<f64>,
}

impl CpuSnapshot {
    /// Reads the counters of this process, of the nats-server with `nats_server_pid` and of the
    /// machine.
    pub fn now(nats_server_pid: Option<u32>) -> CpuSnapshot {
        let read = |path: String| std::fs::read_to_string(path).ok();
        CpuSnapshot {
            process: read("/proc/self/stat".into()).and_then(|s| process_ticks(&s)),
            nats_server: nats_server_pid
                .and_then(|pid| read(format!("/proc/{pid}/stat")))
                .and_then(|s| process_ticks(&s)),
            machine: read("/proc/stat".into()).and_then(|s| machine_ticks(&s)),
        }
    }

    /// The CPU spent from `self` to `end`, per notification of `notifications`.
    pub fn report_until(&self, end: &CpuSnapshot, notifications: u64) -> CpuReport {
        let micros_per_tick = 1e6 / clock_ticks_per_second();
        let per_notification =
            |ticks: u64| ticks as f64 * micros_per_tick / notifications.max(1) as f64;
        let spent = |start: Option<u64>, end: Option<u64>| end?.checked_sub(start?);
        let machine = self.machine.zip(end.machine).and_then(|(start, end)| {
            Some(MachineTicks {
                busy: end.busy.checked_sub(start.busy)?,
                steal: end.steal.checked_sub(start.steal)?,
                total: end.total.checked_sub(start.total)?,
            })
        });
        let share = |ticks: fn(&MachineTicks) -> u64| {
            machine
                .filter(|m| m.total > 0)
                .map(|m| ticks(&m) as f64 / m.total as f64)
        };
        CpuReport {
            process_us: spent(self.process, end.process).map(per_notification),
            nats_server_us: spent(self.nats_server, end.nats_server).map(per_notification),
            machine_us: machine.map(|m| per_notification(m.busy)),
            machine_busy: share(|m| m.busy),
            machine_steal: share(|m| m.steal),
        }
    }
}

/// User plus system ticks of a process, from its `/proc/<pid>/stat`.
fn process_ticks(stat: &str) -> Option<u64> {
    // `pid (comm) state ppid …`: the name may hold spaces and parentheses, so the fields are
    // counted from the last `)`; utime and stime are the 14th and 15th fields.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(field(14)? + field(15)?)
}

/// The machine's counters, from `/proc/stat`.
fn machine_ticks(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let tick = |n: usize| values.get(n).copied().unwrap_or(0);
    let busy = tick(0) + tick(1) + tick(2) + tick(5) + tick(6);
    let steal = tick(7);
    Some(MachineTicks {
        busy,
        steal,
        total: busy + tick(3) + tick(4) + steal,
    })
}

/// The kernel's clock ticks per second for `/proc` times.
fn clock_ticks_per_second() -> f64 {
    #[cfg(target_os = "linux")]
    if let Ok(Some(ticks)) = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        return ticks as f64;
    }
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194304 100 0 0 0 \
                    250 75 0 0 20 0 8 0 1000 1000000 500";
        assert_eq!(process_ticks(stat), Some(325));
    }

    #[test]
    fn a_truncated_process_stat_is_unreadable() {
        assert_eq!(process_ticks("4242 (herald) S 1 4242"), None);
        assert_eq!(process_ticks("garbage"), None);
    }

    #[test]
    fn the_machine_line_splits_into_busy_steal_and_total() {
        let stat = "cpu  1000 10 200 5000 30 0 40 7 0 0\ncpu0 500 5 100 2500 15 0 20 3 0 0\n";
        assert_eq!(
            machine_ticks(stat),
            Some(MachineTicks {
                busy: 1250,
                steal: 7,
                total: 6287
            })
        );
    }

    #[test]
    fn a_report_divides_the_ticks_spent_by_the_notifications() {
        let start = CpuSnapshot {
            process: Some(100),
            nats_server: None,
            machine: Some(MachineTicks {
                busy: 1000,
                steal: 0,
                total: 2000,
            }),
        };
        let end = CpuSnapshot {
            process: Some(300),
            nats_server: Some(50),
            machine: Some(MachineTicks {
                busy: 1300,
                steal: 40,
                total: 2400,
            }),
        };
        let report = start.report_until(&end, 1_000);
        let tick_us = 1e6 / clock_ticks_per_second();
        assert_eq!(report.process_us, Some(200.0 * tick_us / 1_000.0));
        assert_eq!(report.nats_server_us, None, "no reading at the start");
        assert_eq!(report.machine_us, Some(300.0 * tick_us / 1_000.0));
        assert_eq!(report.machine_busy, Some(0.75));
        assert_eq!(report.machine_steal, Some(0.1));
    }
}
