//! Quiet hours: a daily window of local wall-clock time in which a customer wants no
//! non-critical notification. Windows may cross midnight (22:00–08:00); times are read in the
//! customer's IANA time zone, so a window keeps its wall-clock hours across DST changes.

use chrono::{DateTime, Duration, LocalResult, NaiveDate, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// Why quiet hours could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuietHoursError {
    /// A time that is not `HH:MM` or `HH:MM:SS`.
    #[error("invalid time {0:?}: use HH:MM or HH:MM:SS")]
    Time(String),
    /// An unknown time zone name.
    #[error("unknown time zone {0:?}: use an IANA name such as Europe/Berlin")]
    TimeZone(String),
}

/// A daily quiet window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    start: NaiveTime,
    end: NaiveTime,
    tz: Tz,
}

/// Parses `HH:MM` or `HH:MM:SS`.
pub fn parse_time(text: &str) -> Option<NaiveTime> {
    NaiveTime::parse_from_str(text, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(text, "%H:%M"))
        .ok()
}

impl QuietHours {
    /// Reads a window from its stored form.
    pub fn parse(start: &str, end: &str, tz: &str) -> Result<Self, QuietHoursError> {
        let time = |t: &str| parse_time(t).ok_or_else(|| QuietHoursError::Time(t.to_string()));
        Ok(Self {
            start: time(start)?,
            end: time(end)?,
            tz: tz
                .parse()
                .map_err(|_| QuietHoursError::TimeZone(tz.to_string()))?,
        })
    }

    /// When the window that `now` falls in ends, or `None` when `now` is outside the window.
    /// A window whose start equals its end is empty.
    pub fn ends_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.start == self.end {
            return None;
        }
        let local = now.with_timezone(&self.tz);
        let (today, time) = (local.date_naive(), local.time());
        let end_day = if self.start < self.end {
            (self.start <= time && time < self.end).then_some(today)?
        } else if time >= self.start {
            today.succ_opt()?
        } else if time < self.end {
            today
        } else {
            return None;
        };
        self.instant(end_day, now)
    }

    /// The first instant after `now` at which the local clock shows `end` on `day`. An end
    /// inside a DST gap (the clock jumps over it) is the moment the clock jumps; an end that
    /// occurs twice (the clock falls back) is the first occurrence still ahead.
    fn instant(&self, day: NaiveDate, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let wall = day.and_time(self.end);
        match self.tz.from_local_datetime(&wall) {
            LocalResult::Single(at) => Some(at.with_timezone(&Utc)).filter(|at| *at > now),
            LocalResult::Ambiguous(first, second) => [first, second]
                .into_iter()
                .map(|at| at.with_timezone(&Utc))
                .find(|at| *at > now),
            LocalResult::None => {
                // Clocks jump on the minute: counted from the minute `end` falls in, the first
                // minute that exists after the gap is the moment the clock jumped, whatever
                // seconds `end` has.
                let minute = wall.with_second(0)?;
                (1..=24 * 60)
                    .map(|minutes| minute + Duration::minutes(minutes))
                    .find_map(|later| self.tz.from_local_datetime(&later).earliest())
                    .map(|at| at.with_timezone(&Utc))
                    .filter(|at| *at > now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn berlin(start: &str, end: &str) -> QuietHours {
        QuietHours::parse(start, end, "Europe/Berlin").unwrap()
    }

    #[test]
    fn a_window_across_midnight() {
        let q = berlin("22:00", "08:00");
        // 23:30 local (CET, UTC+1) on a winter day: ends 08:00 local next morning.
        assert_eq!(
            q.ends_after(utc("2026-01-10T22:30:00Z")),
            Some(utc("2026-01-11T07:00:00Z"))
        );
        // 03:00 local: the same night's window, ending today 08:00.
        assert_eq!(
            q.ends_after(utc("2026-01-11T02:00:00Z")),
            Some(utc("2026-01-11T07:00:00Z"))
        );
        // Exactly at the end, and in the afternoon: outside.
        assert_eq!(q.ends_after(utc("2026-01-11T07:00:00Z")), None);
        assert_eq!(q.ends_after(utc("2026-01-11T14:00:00Z")), None);
        // Exactly at the start: inside.
        assert_eq!(
            q.ends_after(utc("2026-01-11T21:00:00Z")),
            Some(utc("2026-01-12T07:00:00Z"))
        );
    }

    #[test]
    fn a_window_within_a_day_and_an_empty_one() {
        let q = QuietHours::parse("13:00", "14:30:15", "UTC").unwrap();
        assert_eq!(
            q.ends_after(utc("2026-05-01T13:10:00Z")),
            Some(utc("2026-05-01T14:30:15Z"))
        );
        assert_eq!(q.ends_after(utc("2026-05-01T12:59:59Z")), None);
        assert_eq!(q.ends_after(utc("2026-05-01T14:30:15Z")), None);
        let empty = QuietHours::parse("08:00", "08:00", "UTC").unwrap();
        assert_eq!(empty.ends_after(utc("2026-05-01T08:00:00Z")), None);
    }

    #[test]
    fn spring_forward_keeps_the_wall_clock_end() {
        // Night of 28→29 March 2026: at 02:00 CET Berlin jumps to 03:00 CEST.
        let q = berlin("22:00", "08:00");
        // 23:00 CET (22:00 UTC) → 08:00 CEST is 06:00 UTC: the night is an hour shorter.
        let end = q.ends_after(utc("2026-03-28T22:00:00Z")).unwrap();
        assert_eq!(end, utc("2026-03-29T06:00:00Z"));
        assert_eq!(end - utc("2026-03-28T22:00:00Z"), Duration::hours(8));
    }

    #[test]
    fn fall_back_keeps_the_wall_clock_end() {
        // Night of 24→25 October 2026: at 03:00 CEST Berlin falls back to 02:00 CET.
        let q = berlin("22:00", "08:00");
        // 23:00 CEST (21:00 UTC) → 08:00 CET is 07:00 UTC: ten hours.
        let end = q.ends_after(utc("2026-10-24T21:00:00Z")).unwrap();
        assert_eq!(end, utc("2026-10-25T07:00:00Z"));
        assert_eq!(end - utc("2026-10-24T21:00:00Z"), Duration::hours(10));
    }

    #[test]
    fn an_end_in_the_gap_is_the_jump_and_a_repeated_end_is_the_next_occurrence() {
        // 02:30 does not exist on 29 March 2026 in Berlin: the window ends at the jump,
        // 03:00 CEST = 01:00 UTC.
        let q = berlin("01:00", "02:30");
        assert_eq!(
            q.ends_after(utc("2026-03-29T00:30:00Z")),
            Some(utc("2026-03-29T01:00:00Z"))
        );
        // 02:30 happens twice on 25 October 2026 (CEST 00:30 UTC, then CET 01:30 UTC).
        let q = berlin("01:00", "02:30");
        assert_eq!(
            q.ends_after(utc("2026-10-24T23:30:00Z")),
            Some(utc("2026-10-25T00:30:00Z")),
            "first pass: the first 02:30"
        );
        assert_eq!(
            q.ends_after(utc("2026-10-25T01:10:00Z")),
            Some(utc("2026-10-25T01:30:00Z")),
            "second pass through 02:10: the second 02:30"
        );
    }

    #[test]
    fn an_end_with_seconds_in_the_gap_is_the_jump_itself() {
        // 02:30:30 does not exist on 29 March 2026 in Berlin: the window ends when the clock
        // jumps (03:00 CEST = 01:00:00 UTC), not 30 seconds after it.
        let q = berlin("01:00", "02:30:30");
        assert_eq!(
            q.ends_after(utc("2026-03-29T00:30:00Z")),
            Some(utc("2026-03-29T01:00:00Z"))
        );
    }

    #[test]
    fn bad_input_is_named() {
        assert_eq!(
            QuietHours::parse("25:00", "08:00", "UTC"),
            Err(QuietHoursError::Time("25:00".into()))
        );
        assert_eq!(
            QuietHours::parse("22:00", "08:00", "Mars/Olympus"),
            Err(QuietHoursError::TimeZone("Mars/Olympus".into()))
        );
    }
}
