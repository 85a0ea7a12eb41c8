//! Throughput and latency over the last hour as server-rendered SVG: pure geometry from per-minute
//! aggregates, drawn by the feed template. Only numbers and fixed words reach the SVG.

use chrono::{DateTime, Duration, Utc};
use herald_entities::{NotificationStatus, repo::activity::MinuteCount};

use crate::history::percentile;

/// Drawing width in SVG units.
const WIDTH: f64 = 720.0;
/// Drawing height in SVG units.
const HEIGHT: f64 = 180.0;
/// Room for the y-axis labels.
const LEFT: f64 = 44.0;
/// Room for the x-axis labels.
const BOTTOM: f64 = 20.0;
/// Room above the highest value.
const TOP: f64 = 8.0;

/// How notifications are grouped in the throughput plot, bottom to top.
const GROUPS: [(&str, &[NotificationStatus]); 4] = [
    (
        "ok",
        &[NotificationStatus::Sent, NotificationStatus::Delivered],
    ),
    (
        "failed",
        &[NotificationStatus::Failed, NotificationStatus::Dead],
    ),
    (
        "other",
        &[NotificationStatus::Skipped, NotificationStatus::Cancelled],
    ),
    (
        "pending",
        &[
            NotificationStatus::Queued,
            NotificationStatus::Scheduled,
            NotificationStatus::Processing,
        ],
    ),
];

/// A rectangle of a bar chart.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bar {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
    /// CSS class: the status group.
    pub class: &'static str,
    /// Tooltip, e.g. `14:05 ok: 12`.
    pub title: String,
}

/// A polyline with a legend name; each point is also drawn as a dot, so a lone minute shows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Line {
    /// CSS class and legend name (`p50`, `p95`).
    pub class: &'static str,
    /// The points, left to right.
    pub points: Vec<(f64, f64)>,
}

impl Line {
    /// The SVG `points` attribute.
    pub fn svg_points(&self) -> String {
        self.points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// An axis label.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Label {
    pub x: f64,
    pub y: f64,
    /// CSS class: `y` (right-aligned values) or `x` (times).
    pub class: &'static str,
    pub text: String,
}

/// One drawing.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Plot {
    pub width: f64,
    pub height: f64,
    pub bars: Vec<Bar>,
    pub lines: Vec<Line>,
    pub labels: Vec<Label>,
    /// The baseline's y.
    pub base: f64,
    /// Where the plotting area starts on the left.
    pub left: f64,
}

/// One minute in numbers, for the table beside the plots (screen readers, no-SVG browsers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MinuteRow {
    pub minute: String,
    /// Counts per group, in [`GROUPS`] order.
    pub counts: [i64; 4],
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
}

/// The window plotted: `minutes` minutes ending at the current minute.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub start: DateTime<Utc>,
    pub minutes: u32,
}

impl Window {
    /// The last `minutes` whole minutes up to and including the one `now` is in.
    pub fn ending(now: DateTime<Utc>, minutes: u32) -> Self {
        let seconds = now.timestamp();
        let this_minute =
            DateTime::from_timestamp(seconds - seconds.rem_euclid(60), 0).unwrap_or(now);
        Window {
            start: this_minute - Duration::minutes(i64::from(minutes) - 1),
            minutes,
        }
    }

    fn minute_index(&self, at: DateTime<Utc>) -> Option<usize> {
        let index = (at - self.start).num_seconds().div_euclid(60);
        (0..i64::from(self.minutes))
            .contains(&index)
            .then_some(index as usize)
    }

    fn label(&self, minute: usize) -> String {
        (self.start + Duration::minutes(minute as i64))
            .format("%H:%M")
            .to_string()
    }

    fn slot(&self) -> f64 {
        (WIDTH - LEFT) / f64::from(self.minutes.max(1))
    }

    fn x(&self, minute: usize) -> f64 {
        LEFT + self.slot() * minute as f64
    }
}

/// Counts per minute and group.
pub(crate) fn grouped(window: &Window, counts: &[MinuteCount]) -> Vec<[i64; 4]> {
    let mut out = vec![[0i64; 4]; window.minutes as usize];
    for count in counts {
        let Some(group) = GROUPS.iter().position(|(_, s)| s.contains(&count.status)) else {
            continue;
        };
        if let Some(slot) = out.get_mut(count.minute as usize) {
            slot[group] += count.count;
        }
    }
    out
}

/// (p50, p95) per minute of the latencies of notifications created in that minute.
pub(crate) fn percentiles(
    window: &Window,
    latencies: &[(DateTime<Utc>, i64)],
) -> Vec<Option<(i64, i64)>> {
    let mut per_minute = vec![Vec::new(); window.minutes as usize];
    for (at, ms) in latencies {
        if let Some(index) = window.minute_index(*at) {
            per_minute[index].push(*ms);
        }
    }
    per_minute
        .into_iter()
        .map(|mut values| {
            values.sort_unstable();
            percentile(&values, 50).zip(percentile(&values, 95))
        })
        .collect()
}

/// Stacked bars: notifications accepted per minute, by status group.
pub(crate) fn throughput(window: &Window, per_minute: &[[i64; 4]]) -> Plot {
    let max = per_minute
        .iter()
        .map(|groups| groups.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let scale = (HEIGHT - BOTTOM - TOP) / max as f64;
    let base = HEIGHT - BOTTOM;
    let width = (window.slot() - 1.0).max(1.0);
    let mut bars = Vec::new();
    for (minute, groups) in per_minute.iter().enumerate() {
        let mut top = base;
        for ((class, _), count) in GROUPS.iter().zip(groups) {
            if *count == 0 {
                continue;
            }
            let h = *count as f64 * scale;
            top -= h;
            bars.push(Bar {
                x: window.x(minute),
                y: top,
                w: width,
                h,
                class,
                title: format!("{} {class}: {count}", window.label(minute)),
            });
        }
    }
    Plot {
        bars,
        labels: axis_labels(window, max, ""),
        ..frame()
    }
}

/// p50 and p95 accept-to-sent latency per minute, as two lines through the minutes with data.
pub(crate) fn latency(window: &Window, per_minute: &[Option<(i64, i64)>]) -> Plot {
    let max = per_minute
        .iter()
        .flatten()
        .map(|(_, p95)| *p95)
        .max()
        .unwrap_or(0)
        .max(1);
    let scale = (HEIGHT - BOTTOM - TOP) / max as f64;
    let base = HEIGHT - BOTTOM;
    let half = window.slot() / 2.0;
    let line = |class: &'static str, pick: fn(&(i64, i64)) -> i64| Line {
        class,
        points: per_minute
            .iter()
            .enumerate()
            .filter_map(|(minute, p)| p.as_ref().map(|p| (minute, pick(p))))
            .map(|(minute, ms)| (window.x(minute) + half, base - ms as f64 * scale))
            .collect(),
    };
    Plot {
        lines: vec![line("p50", |p| p.0), line("p95", |p| p.1)],
        labels: axis_labels(window, max, " ms"),
        ..frame()
    }
}

/// The table rows: minutes with any activity, newest first.
pub(crate) fn rows(
    window: &Window,
    per_minute: &[[i64; 4]],
    latency: &[Option<(i64, i64)>],
) -> Vec<MinuteRow> {
    let mut rows: Vec<MinuteRow> = per_minute
        .iter()
        .zip(latency)
        .enumerate()
        .filter(|(_, (counts, p))| counts.iter().any(|c| *c > 0) || p.is_some())
        .map(|(minute, (counts, p))| MinuteRow {
            minute: window.label(minute),
            counts: *counts,
            p50_ms: p.map(|p| p.0),
            p95_ms: p.map(|p| p.1),
        })
        .collect();
    rows.reverse();
    rows
}

fn frame() -> Plot {
    Plot {
        width: WIDTH,
        height: HEIGHT,
        base: HEIGHT - BOTTOM,
        left: LEFT,
        ..Plot::default()
    }
}

/// The maximum on the y axis, and a time label every 15 minutes.
fn axis_labels(window: &Window, max: i64, unit: &str) -> Vec<Label> {
    let mut labels = vec![
        Label {
            x: LEFT - 4.0,
            y: TOP + 8.0,
            class: "y",
            text: format!("{max}{unit}"),
        },
        Label {
            x: LEFT - 4.0,
            y: HEIGHT - BOTTOM,
            class: "y",
            text: "0".into(),
        },
    ];
    labels.extend(
        (0..window.minutes as usize)
            .step_by(15)
            .map(|minute| Label {
                x: window.x(minute),
                y: HEIGHT - 4.0,
                class: "x",
                text: window.label(minute),
            }),
    );
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Window {
        let now = DateTime::parse_from_rfc3339("2025-03-01T10:59:30Z")
            .expect("time")
            .with_timezone(&Utc);
        Window::ending(now, 60)
    }

    #[test]
    fn the_window_ends_with_the_current_minute() {
        let w = window();
        assert_eq!(w.start.to_rfc3339(), "2025-03-01T10:00:00+00:00");
        assert_eq!(w.minute_index(w.start), Some(0));
        assert_eq!(
            w.minute_index(w.start + Duration::seconds(59 * 60 + 59)),
            Some(59)
        );
        assert_eq!(w.minute_index(w.start - Duration::seconds(1)), None);
        assert_eq!(w.minute_index(w.start + Duration::minutes(60)), None);
    }

    #[test]
    fn bars_stack_by_group_and_the_tallest_fills_the_height() {
        let w = window();
        let counts = [
            MinuteCount {
                minute: 3,
                status: NotificationStatus::Sent,
                count: 6,
            },
            MinuteCount {
                minute: 3,
                status: NotificationStatus::Dead,
                count: 2,
            },
            MinuteCount {
                minute: 5,
                status: NotificationStatus::Queued,
                count: 1,
            },
            MinuteCount {
                minute: 99,
                status: NotificationStatus::Sent,
                count: 1,
            },
        ];
        let per_minute = grouped(&w, &counts);
        assert_eq!(per_minute[3], [6, 2, 0, 0]);
        assert_eq!(per_minute[5], [0, 0, 0, 1]);
        let plot = throughput(&w, &per_minute);
        assert_eq!(plot.bars.len(), 3);
        let (ok, failed) = (&plot.bars[0], &plot.bars[1]);
        assert_eq!((ok.class, failed.class), ("ok", "failed"));
        assert!(
            (ok.y + ok.h - plot.base).abs() < 1e-9,
            "ok sits on the base"
        );
        assert!((failed.y + failed.h - ok.y).abs() < 1e-9, "failed on top");
        assert!((failed.y - TOP).abs() < 1e-9, "the tallest reaches the top");
        assert_eq!(ok.title, "10:03 ok: 6");
        assert!(plot.labels.iter().any(|l| l.text == "8"));
    }

    #[test]
    fn latency_percentiles_per_minute() {
        let w = window();
        let at = |minute: i64| w.start + Duration::minutes(minute) + Duration::seconds(5);
        let mut latencies: Vec<_> = (1..=100).map(|ms| (at(2), ms)).collect();
        latencies.push((at(7), 40));
        latencies.push((w.start - Duration::minutes(1), 9_999));
        let p = percentiles(&w, &latencies);
        assert_eq!(p[2], Some((50, 95)));
        assert_eq!(p[7], Some((40, 40)));
        assert_eq!(p[0], None);
        let plot = latency(&w, &p);
        assert_eq!(plot.lines.len(), 2);
        assert_eq!(plot.lines[1].points.len(), 2);
        assert_eq!(plot.lines[1].svg_points().split(' ').count(), 2);
        let (_, top) = plot.lines[1].points[0];
        assert!((top - TOP).abs() < 1e-9, "the highest p95 reaches the top");
        assert!(plot.labels.iter().any(|l| l.text == "95 ms"));
        let table = rows(&w, &grouped(&w, &[]), &p);
        assert_eq!(table.len(), 2);
        assert_eq!(table[0].minute, "10:07", "newest first");
        assert_eq!(table[1].p95_ms, Some(95));
    }
}
