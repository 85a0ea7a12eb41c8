//! Memory over time during a steady-rate run (a soak): the process's resident set size and the
//! size of the per-user rate limiter registry, sampled every few seconds, and whether the resident
//! set stopped growing.

use serde::Serialize;

/// Growth of the late samples' peak over the middle samples' peak that still counts as a plateau,
/// as a share of the middle peak…
const PLATEAU_SHARE: f64 = 0.05;
/// …or in MiB, whichever is larger (allocator noise on a small process).
const PLATEAU_MIB: f64 = 8.0;

/// One sample.
#[derive(Debug, Clone, Serialize)]
pub struct MemorySample {
    /// Seconds since the load started.
    pub at_secs: f64,
    /// Resident set size of this process (engine, sinks and load generator), MiB; absent when
    /// `/proc` could not be read (e.g. out of file descriptors).
    pub rss_mib: Option<f64>,
    /// Live per-user rate limiter actors, when the registry answered.
    pub rate_limiter_users: Option<usize>,
    /// Notifications the SMTP sink accepted so far.
    pub sent: u64,
}

/// The series and its verdict.
#[derive(Debug, Serialize)]
pub struct MemoryReport {
    /// Every sample, oldest first.
    pub samples: Vec<MemorySample>,
    /// Peak RSS of the last third of the samples minus that of the middle third, MiB.
    pub late_growth_mib: f64,
    /// Whether that growth is within noise (5% or 8 MiB): memory plateaued rather than grew.
    /// `None` with fewer than three samples.
    pub plateaued: Option<bool>,
}

impl MemoryReport {
    /// Judges a series. The first third is warm-up (pools, caches and the registry filling up);
    /// a leak keeps growing after it, so the last third is compared with the middle one.
    pub fn from_samples(samples: Vec<MemorySample>) -> MemoryReport {
        let third = samples.len() / 3;
        if third == 0 {
            return MemoryReport {
                samples,
                late_growth_mib: 0.0,
                plateaued: None,
            };
        }
        let peak = |s: &[MemorySample]| s.iter().filter_map(|s| s.rss_mib).fold(0.0, f64::max);
        let middle = peak(&samples[third..samples.len() - third]);
        let late = peak(&samples[samples.len() - third..]);
        let growth = late - middle;
        MemoryReport {
            late_growth_mib: growth,
            plateaued: Some(growth <= (middle * PLATEAU_SHARE).max(PLATEAU_MIB)),
            samples,
        }
    }
}

/// Resident set size of this process now (Linux `VmRSS`), MiB.
pub fn current_rss_mib() -> Option<f64> {
    proc_status_mib("VmRSS:")
}

/// Peak resident set size of this process (Linux `VmHWM`), MiB; 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM:").unwrap_or(0.0)
}

fn proc_status_mib(field: &str) -> Option<f64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(rss: &[f64]) -> Vec<MemorySample> {
        rss.iter()
            .enumerate()
            .map(|(i, &rss_mib)| MemorySample {
                at_secs: i as f64 * 5.0,
                rss_mib: Some(rss_mib),
                rate_limiter_users: Some(100),
                sent: i as u64 * 1000,
            })
            .collect()
    }

    #[test]
    fn warm_up_growth_then_flat_is_a_plateau() {
        let report = MemoryReport::from_samples(series(&[50.0, 120.0, 180.0, 200.0, 201.0, 203.0]));
        assert_eq!(report.plateaued, Some(true));
        assert!((report.late_growth_mib - 3.0).abs() < 1e-9);
    }

    #[test]
    fn steady_growth_after_warm_up_is_not() {
        let report = MemoryReport::from_samples(series(&[50.0, 100.0, 150.0, 200.0, 250.0, 300.0]));
        assert_eq!(report.plateaued, Some(false));
        assert!((report.late_growth_mib - 100.0).abs() < 1e-9);
    }

    #[test]
    fn too_few_samples_give_no_verdict() {
        assert_eq!(
            MemoryReport::from_samples(series(&[50.0, 60.0])).plateaued,
            None
        );
    }

    #[test]
    fn this_process_has_a_resident_set() {
        let now = current_rss_mib().expect("Linux has /proc/self/status");
        assert!(now > 0.0 && peak_rss_mib() >= now);
    }
}
