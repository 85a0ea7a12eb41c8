//! An SMTP server that accepts every message and only counts it: the bench measures Herald, not a
//! mail server. It answers at once, or after a set delay per round trip, as a relay across a
//! network would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};

/// A counting SMTP sink on loopback.
pub struct CountingSmtpSink {
    port: u16,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingSmtpSink {
    /// Listens on `127.0.0.1:0`; every batch of replies waits `delay` before it is sent.
    pub async fn start(delay: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(session(stream, counter.clone(), delay));
            }
        });
        Ok(Self {
            port,
            accepted,
            task,
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Messages accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for CountingSmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One SMTP session: every command is accepted; the body is read up to the lone dot, or as
/// many octets as a BDAT chunk announces (every chunk counts as a message: Herald sends each in
/// one `BDAT <size> LAST`).
///
/// It offers PIPELINING and CHUNKING and, like a real server (Postfix's `smtpd`), sends its
/// replies only when it has read everything the client sent so far: pipelined commands get their
/// replies in one write, `delay` after the last of them was read.
async fn session(stream: TcpStream, accepted: Arc<AtomicU64>, delay: Duration) {
    let (read, write) = stream.into_split();
    // Room for a whole pipelined write, so the replies wait for `delay` once per client write
    // rather than at each refill of a smaller buffer.
    let mut lines = BufReader::with_capacity(256 * 1024, read);
    let mut write = BufWriter::new(write);
    if write.write_all(b"220 bench ESMTP\r\n").await.is_err() || write.flush().await.is_err() {
        return;
    }
    let mut line = String::new();
    let mut in_data = false;
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply: &[u8] = if in_data {
            if line != ".\r\n" {
                continue;
            }
            in_data = false;
            accepted.fetch_add(1, Ordering::Relaxed);
            b"250 queued\r\n"
        } else {
            let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" => b"250-bench\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
                "DATA" => {
                    in_data = true;
                    b"354 go ahead\r\n"
                }
                "BDAT" => {
                    if !read_chunk(&mut lines, &line).await {
                        return;
                    }
                    accepted.fetch_add(1, Ordering::Relaxed);
                    b"250 queued\r\n"
                }
                "QUIT" => {
                    let _ = write.write_all(b"221 bye\r\n").await;
                    let _ = write.flush().await;
                    return;
                }
                _ => b"250 ok\r\n",
            }
        };
        if write.write_all(reply).await.is_err() {
            return;
        }
        if lines.buffer().is_empty() {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if write.flush().await.is_err() {
                return;
            }
        }
    }
}

/// Reads and drops the chunk a `BDAT <size> …` line announces; `false` if the size is unreadable
/// or the connection ends first.
async fn read_chunk(reader: &mut BufReader<OwnedReadHalf>, command: &str) -> bool {
    let Some(size) = command
        .split_whitespace()
        .nth(1)
        .and_then(|size| size.parse::<u64>().ok())
    else {
        return false;
    };
    let mut chunk = reader.take(size);
    matches!(tokio::io::copy_buf(&mut chunk, &mut tokio::io::sink()).await, Ok(read) if read == size)
}
