//! Telling a database that is unavailable from a write that is wrong: only the first is worth
//! waiting out and trying again (the StatusWriter holds its messages; the API answers 503).

use sea_orm::{DbErr, RuntimeErr};

use crate::RepoError;

impl RepoError {
    /// Whether this error means the database is unavailable rather than that the query is wrong
    /// (see [`is_outage`]).
    pub fn is_outage(&self) -> bool {
        match self {
            RepoError::Db(err) => is_outage(err),
            RepoError::Json { .. } | RepoError::WriterStopped => false,
        }
    }
}

/// Whether `err` means the database is unavailable (unreachable, restarting, read-only, out of
/// room, locked by someone else) rather than that this write is wrong: only then is waiting and
/// retrying right.
pub fn is_outage(err: &DbErr) -> bool {
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(cause)) | DbErr::Query(RuntimeErr::SqlxError(cause)) => {
            is_sqlx_outage(cause)
        }
        _ => err
            .to_string()
            .to_lowercase()
            .contains("database is locked"),
    }
}

/// Whether `err` is PostgreSQL giving up waiting for a lock under `lock_timeout` (SQLSTATE
/// `55P03`, lock_not_available): the statement did nothing and may be tried again.
pub fn is_lock_timeout(err: &DbErr) -> bool {
    match err {
        DbErr::Exec(RuntimeErr::SqlxError(cause)) | DbErr::Query(RuntimeErr::SqlxError(cause)) => {
            matches!(&**cause, sea_orm::sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
        }
        _ => false,
    }
}

fn is_sqlx_outage(err: &sea_orm::sqlx::Error) -> bool {
    use sea_orm::sqlx::Error;
    match err {
        Error::Io(_)
        | Error::Tls(_)
        | Error::Protocol(_)
        | Error::PoolTimedOut
        | Error::PoolClosed
        | Error::WorkerCrashed => true,
        Error::Database(db) => db.code().is_some_and(|code| is_outage_code(&code)),
        _ => false,
    }
}

/// PostgreSQL (five-character SQLSTATE): a connection exception (class 08), the server shutting
/// down or starting (57P01–57P03) or out of resources (class 53: disk full, out of memory, too
/// many connections), a read-only server (25006: a failover's old primary, or a replica still
/// being promoted), a statement cancelled (57014), a serialization failure or deadlock (40001,
/// 40P01: the same write succeeds when tried again), a lock not had in time (55P03, under
/// `lock_timeout`), a system or I/O error of the server (58000, 58030). SQLite (a number): busy
/// or locked (primary codes 5 and 6), out of memory (7), a read-only database (8: its file or
/// file system turned read-only), an I/O error (10), a full disk (13), a file it cannot open
/// (14) or a locking protocol error (15), with their extended codes.
fn is_outage_code(code: &str) -> bool {
    if code.len() == 5 {
        return code.starts_with("08")
            || code.starts_with("53")
            || matches!(
                code,
                "57P01"
                    | "57P02"
                    | "57P03"
                    | "25006"
                    | "57014"
                    | "40001"
                    | "40P01"
                    | "55P03"
                    | "58000"
                    | "58030"
            );
    }
    code.parse::<i32>()
        .is_ok_and(|sqlite| matches!(sqlite & 0xff, 5 | 6 | 7 | 8 | 10 | 13 | 14 | 15))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn exec(cause: sea_orm::sqlx::Error) -> DbErr {
        DbErr::Exec(RuntimeErr::SqlxError(Arc::new(cause)))
    }

    #[test]
    fn a_dropped_connection_is_an_outage_whatever_its_message() {
        let eof = std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "expected to read 5 bytes, got 0 bytes at EOF",
        );
        assert!(is_outage(&exec(sea_orm::sqlx::Error::Io(eof))));
        assert!(is_outage(&exec(sea_orm::sqlx::Error::PoolTimedOut)));
        assert!(is_outage(&DbErr::ConnectionAcquire(
            sea_orm::ConnAcquireErr::Timeout
        )));
    }

    #[test]
    fn a_wrong_write_is_not_an_outage() {
        assert!(!is_outage(&exec(sea_orm::sqlx::Error::RowNotFound)));
        assert!(!is_outage(&DbErr::Custom("no such notification".into())));
        assert!(!is_outage(&DbErr::RecordNotInserted));
    }

    #[test]
    fn busy_locked_and_server_state_codes_are_outages_constraint_codes_are_not() {
        for code in [
            "5", "6", "517", "262", "10", "13", "08006", "57P01", "57P03", "53100", "53300",
            "25006", "40001", "40P01",
        ] {
            assert!(is_outage_code(code), "{code}");
        }
        for code in ["1", "19", "2067", "23505", "23503", "42P01", "22001"] {
            assert!(!is_outage_code(code), "{code}");
        }
    }

    #[test]
    fn a_lock_timeout_a_system_error_and_an_unopenable_or_read_only_file_are_outages() {
        // PostgreSQL: lock_not_available, system_error, io_error (classes 55P03, 58).
        // SQLite: READONLY, CANTOPEN, PROTOCOL, and extended codes of them.
        for code in [
            "55P03", "58000", "58030", "8", "14", "15", "264", "520", "1032", "270",
        ] {
            assert!(is_outage_code(code), "{code}");
        }
        for code in [
            "55000", "55006", "58P01", "22021", "22P05", "54000", "11", "12",
        ] {
            assert!(!is_outage_code(code), "{code}");
        }
    }
}
