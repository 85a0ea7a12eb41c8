use std::{fmt::Display, net::IpAddr, time::Duration};

use futures_util::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[cfg(feature = "tokio1")]
use super::async_net::AsyncTokioStream;
#[cfg(feature = "tracing")]
use super::escape_crlf;
#[allow(deprecated)]
use super::{
    ClientCodec, MAX_RESPONSE_BYTES, MAX_RESPONSE_LINE_BYTES, TlsParameters,
    async_net::AsyncNetworkStream,
};
use crate::{
    Envelope,
    transport::smtp::{
        authentication::{Credentials, Mechanism},
        commands::{Auth, Data, Ehlo, Mail, Noop, Quit, Rcpt, Starttls},
        error,
        error::{Error, TransactionStep},
        extension::{ClientId, Extension, MailBodyParameter, MailParameter, ServerInfo},
        response::{Response, parse_response},
    },
};

macro_rules! try_smtp (
    ($err: expr, $client: ident) => ({
        match $err {
            Ok(val) => val,
            Err(err) => {
                $client.abort().await;
                return Err(From::from(err))
            },
        }
    })
);

/// Structure that implements the SMTP client
pub struct AsyncSmtpConnection {
    /// TCP stream between client and server
    /// Value is None before connection
    #[allow(deprecated)]
    stream: BufReader<AsyncNetworkStream>,
    /// Panic state
    panic: bool,
    /// Information about the server
    server_info: ServerInfo,
    /// How many replies were read, positive or negative, the greeting included (Herald's
    /// addition, see [`AsyncSmtpConnection::replies_read`]).
    replies: u64,
}

impl AsyncSmtpConnection {
    /// Get information about the server
    pub fn server_info(&self) -> &ServerInfo {
        &self.server_info
    }

    /// Does not use `extension` on this connection even though the server offered it, for a
    /// server that offers an extension it mishandles (Herald's addition). Call it after
    /// STARTTLS, whose second EHLO reads the server's offer again.
    pub fn ignore_extension(&mut self, extension: Extension) {
        self.server_info.ignore_feature(extension);
    }

    /// Connects with existing async stream
    ///
    /// Sends EHLO and parses server information
    #[cfg(feature = "tokio1")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio1")))]
    pub async fn connect_with_transport(
        stream: Box<dyn AsyncTokioStream>,
        hello_name: &ClientId,
    ) -> Result<AsyncSmtpConnection, Error> {
        #[allow(deprecated)]
        let stream = AsyncNetworkStream::use_existing_tokio1(stream);
        Self::connect_impl(stream, hello_name).await
    }

    /// Connects to the configured server
    ///
    /// If `tls_parameters` is `Some`, then the connection will use Implicit TLS (sometimes
    /// referred to as `SMTPS`). See also [`AsyncSmtpConnection::starttls`].
    ///
    /// If `local_address` is `Some`, then the address provided shall be used to bind the
    /// connection to a specific local address using [`tokio1_crate::net::TcpSocket::bind`].
    ///
    /// Sends EHLO and parses server information
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use lettre::transport::smtp::{client::{AsyncSmtpConnection, TlsParameters}, extension::ClientId};
    /// # use tokio1_crate::{self as tokio, net::ToSocketAddrs as _};
    /// #
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let connection = AsyncSmtpConnection::connect_tokio1(
    ///     ("example.com", 465),
    ///     Some(Duration::from_secs(60)),
    ///     &ClientId::default(),
    ///     Some(TlsParameters::new("example.com".to_owned())?),
    ///     None,
    /// )
    /// .await?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "tokio1")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio1")))]
    pub async fn connect_tokio1<T: tokio1_crate::net::ToSocketAddrs>(
        server: T,
        timeout: Option<Duration>,
        hello_name: &ClientId,
        tls_parameters: Option<TlsParameters>,
        local_address: Option<IpAddr>,
    ) -> Result<AsyncSmtpConnection, Error> {
        #[allow(deprecated)]
        let stream =
            AsyncNetworkStream::connect_tokio1(server, timeout, tls_parameters, local_address)
                .await?;
        Self::connect_impl(stream, hello_name).await
    }

    /// Connects to the configured server
    ///
    /// Sends EHLO and parses server information
    #[cfg(feature = "async-std1")]
    #[cfg_attr(docsrs, doc(cfg(feature = "async-std1")))]
    pub async fn connect_asyncstd1<T: async_std::net::ToSocketAddrs>(
        server: T,
        timeout: Option<Duration>,
        hello_name: &ClientId,
        tls_parameters: Option<TlsParameters>,
    ) -> Result<AsyncSmtpConnection, Error> {
        #[allow(deprecated)]
        let stream = AsyncNetworkStream::connect_asyncstd1(server, timeout, tls_parameters).await?;
        Self::connect_impl(stream, hello_name).await
    }

    #[allow(deprecated)]
    async fn connect_impl(
        stream: AsyncNetworkStream,
        hello_name: &ClientId,
    ) -> Result<AsyncSmtpConnection, Error> {
        let stream = BufReader::new(stream);
        let mut conn = AsyncSmtpConnection {
            stream,
            panic: false,
            server_info: ServerInfo::default(),
            replies: 0,
        };
        // TODO log
        let _response = conn.read_response().await?;

        conn.ehlo(hello_name).await?;

        // Print server information
        #[cfg(feature = "tracing")]
        tracing::debug!("server {}", conn.server_info);
        Ok(conn)
    }

    pub async fn send(&mut self, envelope: &Envelope, email: &[u8]) -> Result<Response, Error> {
        let mail_options = self.mail_options(envelope, email)?;

        if self.server_info().supports_feature(Extension::Pipelining) {
            // One recipient only: with several, a chunk is delivered to those accepted even
            // when another is refused, and the refusal would report a delivered message as failed.
            if envelope.to().len() == 1 && self.server_info().supports_feature(Extension::Chunking)
            {
                return self.send_chunked(envelope, mail_options, email).await;
            }
            return self.send_pipelined(envelope, mail_options, email).await;
        }

        try_smtp!(
            self.command(Mail::new(envelope.from().cloned(), mail_options))
                .await
                .map_err(|err| err.at(TransactionStep::Mail)),
            self
        );

        // Recipient
        for to_address in envelope.to() {
            try_smtp!(
                self.command(Rcpt::new(to_address.clone(), vec![]))
                    .await
                    .map_err(|err| err.at(TransactionStep::Rcpt)),
                self
            );
        }

        // Data
        try_smtp!(
            self.command(Data)
                .await
                .map_err(|err| err.at(TransactionStep::Data)),
            self
        );

        // Message content
        let result = try_smtp!(
            self.message(email)
                .await
                .map_err(|err| err.at(TransactionStep::Data)),
            self
        );
        Ok(result)
    }

    /// Sends MAIL, every RCPT and DATA in one write and then reads their replies in order
    /// ([RFC 2920](https://tools.ietf.org/html/rfc2920)): two round trips per message
    /// instead of three plus one per recipient.
    ///
    /// The first negative reply is the error returned (a failed MAIL makes the RCPTs after it
    /// fail with "bad sequence", which must not hide the real cause), and the connection is
    /// aborted, as on the sequential path.
    async fn send_pipelined(
        &mut self,
        envelope: &Envelope,
        mail_options: Vec<MailParameter>,
        email: &[u8],
    ) -> Result<Response, Error> {
        let mut commands = envelope_commands(envelope, mail_options);
        commands.push_str(&Data.to_string());
        try_smtp!(self.write(commands.as_bytes()).await, self);

        // MAIL, the RCPTs, then DATA.
        let replies = envelope.to().len() + 2;
        for index in 0..replies {
            try_smtp!(
                self.read_response()
                    .await
                    .map_err(|err| err.at(transaction_step(index, replies))),
                self
            );
        }

        let result = try_smtp!(
            self.message(email)
                .await
                .map_err(|err| err.at(TransactionStep::Data)),
            self
        );
        Ok(result)
    }

    /// Sends MAIL, every RCPT and the whole message as one `BDAT <size> LAST` chunk in one write,
    /// then reads their replies in order ([RFC 3030](https://tools.ietf.org/html/rfc3030) CHUNKING
    /// with [RFC 2920](https://tools.ietf.org/html/rfc2920) PIPELINING): one round trip per
    /// message. The content goes as it is: BDAT has neither dot-stuffing nor a terminator.
    ///
    /// Replies are read as [`Self::send_many`] reads each transaction of a group: the first
    /// negative one is the error and the connection is aborted. A server reads a chunk even after
    /// refusing its transaction (RFC 3030 section 2), so the session stays in step until then.
    /// Used for one recipient only (see [`AsyncSmtpConnection::send`]). Content that does not end
    /// a line gets a final CRLF, as DATA's terminator would give it.
    async fn send_chunked(
        &mut self,
        envelope: &Envelope,
        mail_options: Vec<MailParameter>,
        email: &[u8],
    ) -> Result<Response, Error> {
        let mut out = Vec::new();
        chunk_commands(&mut out, envelope, mail_options, email);
        try_smtp!(self.write(&out).await, self);

        // MAIL and the RCPTs, then the chunk's reply, which is the message's: read as a group
        // reads each of its transactions.
        let result = try_smtp!(
            self.read_transaction(envelope.to().len() + 2)
                .await
                .and_then(|replied| replied),
            self
        );
        Ok(result)
    }

    /// The MAIL parameters `envelope` and `email` need, or why this server cannot take them.
    fn mail_options(&self, envelope: &Envelope, email: &[u8]) -> Result<Vec<MailParameter>, Error> {
        let mut mail_options = vec![];

        // Internationalization handling
        //
        // * 8BITMIME: https://tools.ietf.org/html/rfc6152
        // * SMTPUTF8: https://tools.ietf.org/html/rfc653

        // Check for non-ascii addresses and use the SMTPUTF8 option if any.
        if envelope.has_non_ascii_addresses() {
            if !self.server_info().supports_feature(Extension::SmtpUtfEight) {
                // don't try to send non-ascii addresses (per RFC)
                return Err(error::client(
                    "Envelope contains non-ascii chars but server does not support SMTPUTF8",
                ));
            }
            mail_options.push(MailParameter::SmtpUtfEight);
        }

        // Check for non-ascii content in the message
        if !email.is_ascii() {
            if !self.server_info().supports_feature(Extension::EightBitMime) {
                return Err(error::client(
                    "Message contains non-ascii chars but server does not support 8BITMIME",
                ));
            }
            mail_options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        Ok(mail_options)
    }

    /// Sends several messages, each with its own result, handed to `outcome` with the message's
    /// index as soon as it is known: a message's result does not wait for the replies to the
    /// messages after it, so a caller that gives up on the group (drops the future) has the
    /// results of the messages answered until then. Each index is handed over once, in the order
    /// given, unless the future is dropped first.
    ///
    /// Where the server offers PIPELINING and CHUNKING and every message has one recipient, all
    /// their transactions (MAIL, RCPT, `BDAT <size> LAST` and the content, as [`Self::send`]
    /// writes one) go out in one write and their replies are read in order: one round trip for
    /// them all ([RFC 2920](https://tools.ietf.org/html/rfc2920) lets a group end with any
    /// command but DATA, VRFY, EXPN, TURN, QUIT and NOOP). Otherwise they are sent one after the
    /// other.
    ///
    /// A negative reply fails its own message only: the server reads a chunk even after refusing
    /// its transaction (RFC 3030 section 2), which leaves the next transaction in step. The
    /// connection is aborted after the group, as a single message's failure aborts it. A write
    /// or read that fails, or a reply that cannot be parsed, fails the message it was for and
    /// every later one, and aborts the connection.
    pub async fn send_many<F>(&mut self, messages: &[(&Envelope, &[u8])], mut outcome: F)
    where
        F: FnMut(usize, Result<Response, Error>),
    {
        let grouped = messages.len() > 1
            && self.server_info().supports_feature(Extension::Pipelining)
            && self.server_info().supports_feature(Extension::Chunking)
            && messages
                .iter()
                .all(|(envelope, _)| envelope.to().len() == 1);
        if !grouped {
            for (index, (envelope, email)) in messages.iter().enumerate() {
                let result = if self.panic {
                    Err(error::client(
                        "an earlier message's failure closed the connection",
                    ))
                } else {
                    self.send(envelope, email).await
                };
                outcome(index, result);
            }
            return;
        }
        let mut out = Vec::new();
        let written: Vec<Result<(), Error>> = messages
            .iter()
            .map(|(envelope, email)| {
                let mail_options = self.mail_options(envelope, email)?;
                chunk_commands(&mut out, envelope, mail_options, email);
                Ok(())
            })
            .collect();
        // Why the connection failed, once it did: every later message fails with it.
        let mut broken = self.write(&out).await.err().map(|err| err.to_string());
        let mut refused = false;
        for (index, (written, (envelope, _))) in written.into_iter().zip(messages).enumerate() {
            let result = match (written, &broken) {
                (Err(err), _) => Err(err),
                (Ok(()), Some(reason)) => Err(error::network(reason.clone())),
                (Ok(()), None) => match self.read_transaction(envelope.to().len() + 2).await {
                    Ok(replied) => {
                        refused |= replied.is_err();
                        replied
                    }
                    Err(err) => {
                        broken = Some(err.to_string());
                        Err(err)
                    }
                },
            };
            outcome(index, result);
        }
        if refused || broken.is_some() {
            self.abort().await;
        }
    }

    /// Reads the `replies` replies to a transaction [`chunk_commands`] wrote (MAIL, the RCPTs,
    /// BDAT): the last one, or the first refusal among them (the inner error); the outer error
    /// when the connection failed or a reply could not be parsed (the refusal before it, if any:
    /// a `421` closes the connection after saying why).
    async fn read_transaction(&mut self, replies: usize) -> Result<Result<Response, Error>, Error> {
        let (mut last, mut refusal) = (None, None);
        for index in 0..replies {
            match self.read_response().await {
                Ok(reply) => last = Some(reply),
                Err(err) if err.is_transient() || err.is_permanent() => {
                    refusal.get_or_insert(err.at(transaction_step(index, replies)));
                }
                Err(err) => return Err(refusal.unwrap_or(err)),
            }
        }
        Ok(match refusal {
            Some(err) => Err(err),
            None => last.ok_or_else(|| error::response("no reply")),
        })
    }

    pub fn has_broken(&self) -> bool {
        self.panic
    }

    /// How many replies this connection has read so far, positive or negative, the greeting
    /// included (Herald's addition). Unchanged over a send that failed tells that the server
    /// answered none of its commands: a connection the server had closed while it sat in a pool
    /// fails its next write's first read, and nothing of that write was accepted.
    pub fn replies_read(&self) -> u64 {
        self.replies
    }

    pub fn can_starttls(&self) -> bool {
        !self.is_encrypted() && self.server_info.supports_feature(Extension::StartTls)
    }

    /// Upgrade the connection using `STARTTLS`.
    ///
    /// As described in [rfc3207]. Note that this mechanism has been deprecated in [rfc8314].
    ///
    /// [rfc3207]: https://www.rfc-editor.org/rfc/rfc3207
    /// [rfc8314]: https://www.rfc-editor.org/rfc/rfc8314
    #[allow(unused_variables)]
    pub async fn starttls(
        &mut self,
        tls_parameters: TlsParameters,
        hello_name: &ClientId,
    ) -> Result<(), Error> {
        if self.server_info.supports_feature(Extension::StartTls) {
            try_smtp!(self.command(Starttls).await, self);
            self.stream.get_mut().upgrade_tls(tls_parameters).await?;
            #[cfg(feature = "tracing")]
            tracing::debug!("connection encrypted");
            // Send EHLO again
            try_smtp!(self.ehlo(hello_name).await, self);
            Ok(())
        } else {
            Err(error::client("STARTTLS is not supported on this server"))
        }
    }

    /// Send EHLO and update server info
    async fn ehlo(&mut self, hello_name: &ClientId) -> Result<(), Error> {
        let ehlo_response = try_smtp!(self.command(Ehlo::new(hello_name.clone())).await, self);
        self.server_info = try_smtp!(ServerInfo::from_response(&ehlo_response), self);
        Ok(())
    }

    pub async fn quit(&mut self) -> Result<Response, Error> {
        Ok(try_smtp!(self.command(Quit).await, self))
    }

    pub async fn abort(&mut self) {
        // Only try to quit if we are not already broken
        if !self.panic {
            self.panic = true;
            let _ = self.command(Quit).await;
        }
        let _ = self.stream.close().await;
    }

    /// Sets the underlying stream
    #[allow(deprecated)]
    pub fn set_stream(&mut self, stream: AsyncNetworkStream) {
        self.stream = BufReader::new(stream);
    }

    /// Tells if the underlying stream is currently encrypted
    pub fn is_encrypted(&self) -> bool {
        self.stream.get_ref().is_encrypted()
    }

    /// Checks if the server is connected using the NOOP SMTP command
    pub async fn test_connected(&mut self) -> bool {
        self.command(Noop).await.is_ok()
    }

    /// Sends an AUTH command with the given mechanism, and handles the challenge if needed
    pub async fn auth(
        &mut self,
        mechanisms: &[Mechanism],
        credentials: &Credentials,
    ) -> Result<Response, Error> {
        let mechanism = self
            .server_info
            .get_auth_mechanism(mechanisms)
            .ok_or_else(|| error::client("No compatible authentication mechanism was found"))?;

        // Limit challenges to avoid blocking
        let mut challenges: u8 = 10;
        let mut response = self
            .command(Auth::new(mechanism, credentials.clone(), None)?)
            .await?;

        while challenges > 0 && response.has_code(334) {
            challenges -= 1;
            response = try_smtp!(
                self.command(Auth::new_from_response(
                    mechanism,
                    credentials.clone(),
                    &response,
                )?)
                .await,
                self
            );
        }

        if challenges == 0 {
            Err(error::response("Unexpected number of challenges"))
        } else {
            Ok(response)
        }
    }

    /// Sends the message content
    pub async fn message(&mut self, message: &[u8]) -> Result<Response, Error> {
        self.message_iter(std::iter::once(message)).await
    }

    /// Sends the message content by consuming an iterator that in its whole represents a message.
    pub async fn message_iter<I, B>(&mut self, message: I) -> Result<Response, Error>
    where
        I: Iterator<Item = B>,
        B: AsRef<[u8]>,
    {
        let mut codec = ClientCodec::new();
        let mut parts = message.peekable();
        while let Some(message_part) = parts.next() {
            let message_part = message_part.as_ref();
            let mut out_buf = Vec::with_capacity(message_part.len() + 5);
            codec.encode(message_part, &mut out_buf);
            if parts.peek().is_none() {
                // The terminator goes out with the last part: one write, one segment.
                out_buf.extend_from_slice(b"\r\n.\r\n");
                self.write(out_buf.as_slice()).await?;
                return self.read_response().await;
            }
            self.write(out_buf.as_slice()).await?;
        }
        self.write(b"\r\n.\r\n").await?;

        self.read_response().await
    }

    /// Sends an SMTP command
    pub async fn command<C: Display>(&mut self, command: C) -> Result<Response, Error> {
        self.write(command.to_string().as_bytes()).await?;
        self.read_response().await
    }

    /// Writes a string to the server
    async fn write(&mut self, string: &[u8]) -> Result<(), Error> {
        self.stream
            .get_mut()
            .write_all(string)
            .await
            .map_err(error::network)?;
        self.stream
            .get_mut()
            .flush()
            .await
            .map_err(error::network)?;

        #[cfg(feature = "tracing")]
        tracing::debug!("Wrote: {}", escape_crlf(&String::from_utf8_lossy(string)));
        Ok(())
    }

    /// Gets the SMTP response
    pub async fn read_response(&mut self) -> Result<Response, Error> {
        let mut buffer = String::with_capacity(100);
        let mut pre = 0;

        while self
            .stream
            .read_line(&mut buffer)
            .await
            .map_err(error::network)?
            > 0
        {
            if buffer.len() - pre > MAX_RESPONSE_LINE_BYTES {
                return Err(error::response("SMTP response line too long"));
            }
            if buffer.len() > MAX_RESPONSE_BYTES {
                return Err(error::response("SMTP response too large"));
            }
            pre = buffer.len();

            #[cfg(feature = "tracing")]
            tracing::debug!("<< {}", escape_crlf(&buffer));
            match parse_response(&buffer) {
                Ok((_remaining, response)) => {
                    self.replies += 1;
                    return if response.is_positive() {
                        Ok(response)
                    } else {
                        Err(error::code_from_response(&response))
                    };
                }
                Err(nom::Err::Failure(e)) => {
                    return Err(error::response(e.to_string()));
                }
                Err(nom::Err::Incomplete(_)) => { /* read more */ }
                Err(nom::Err::Error(e)) => {
                    return Err(error::response(e.to_string()));
                }
            }
        }

        Err(error::response("incomplete response"))
    }

    /// The X509 certificate of the server (DER encoded)
    #[cfg(any(feature = "native-tls", feature = "rustls", feature = "boring-tls"))]
    #[cfg_attr(
        docsrs,
        doc(cfg(any(feature = "native-tls", feature = "rustls", feature = "boring-tls")))
    )]
    pub fn peer_certificate(&self) -> Result<Vec<u8>, Error> {
        self.stream.get_ref().peer_certificate()
    }

    /// Currently this is only avaialable when using Boring TLS and
    /// returns the result of the verification of the TLS certificate
    /// presented by the peer, if any. Only the last error encountered
    /// during verification is presented.
    /// It can be useful when you don't want to fail outright the TLS
    /// negotiation, for example when a self-signed certificate is
    /// encountered, but still want to record metrics or log the fact.
    /// When using DANE verification, the PKI root of trust moves from
    /// the CAs to DNS, so self-signed certificates are permitted as long
    /// as the TLSA records match the leaf or issuer certificates.
    /// It cannot be called on non Boring TLS streams.
    #[cfg(feature = "boring-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "boring-tls")))]
    pub fn tls_verify_result(&self) -> Result<(), Error> {
        self.stream.get_ref().tls_verify_result()
    }

    /// All the X509 certificates of the chain (DER encoded)
    #[cfg(any(feature = "rustls", feature = "boring-tls"))]
    #[cfg_attr(docsrs, doc(cfg(any(feature = "rustls", feature = "boring-tls"))))]
    pub fn certificate_chain(&self) -> Result<Vec<Vec<u8>>, Error> {
        self.stream.get_ref().certificate_chain()
    }
}

/// Appends a transaction that sends `email` as one `BDAT <size> LAST` chunk: MAIL, the RCPTs,
/// the BDAT line and the content. Content that does not end a line gets a final CRLF, as DATA's
/// terminator would give it.
fn chunk_commands(
    out: &mut Vec<u8>,
    envelope: &Envelope,
    mail_options: Vec<MailParameter>,
    email: &[u8],
) {
    let line_end: &[u8] = if email.is_empty() || email.ends_with(b"\r\n") {
        b""
    } else {
        b"\r\n"
    };
    let size = email.len() + line_end.len();
    let mut commands = envelope_commands(envelope, mail_options);
    commands.push_str(&format!("BDAT {size} LAST\r\n"));
    out.reserve(commands.len() + size);
    out.extend_from_slice(commands.as_bytes());
    out.extend_from_slice(email);
    out.extend_from_slice(line_end);
}

/// The command the `index`-th of a transaction's `replies` replies answers: MAIL first, DATA or
/// BDAT last, an RCPT between.
fn transaction_step(index: usize, replies: usize) -> TransactionStep {
    match index {
        0 => TransactionStep::Mail,
        last if last + 1 == replies => TransactionStep::Data,
        _ => TransactionStep::Rcpt,
    }
}

/// MAIL and one RCPT per recipient, as one string for a pipelined write.
fn envelope_commands(envelope: &Envelope, mail_options: Vec<MailParameter>) -> String {
    let mut commands = Mail::new(envelope.from().cloned(), mail_options).to_string();
    for to_address in envelope.to() {
        commands.push_str(&Rcpt::new(to_address.clone(), vec![]).to_string());
    }
    commands
}
