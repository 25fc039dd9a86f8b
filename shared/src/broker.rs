//! Connecting to RabbitMQ and publishing with confirms.
//!
//! [`connect`] waits with exponential backoff while the broker is absent (logging why)
//! instead of crashing, so a worker started before its broker, or cut off from it, comes
//! back by itself.
//!
//! A broker that refuses the login (wrong password, no permission on the vhost, no such
//! vhost) is told apart from one that cannot be reached ([`refusal`]): the log names the
//! user and the vhost, never the password. A worker keeps trying anyway, once per backoff
//! step, since a password may be in the middle of being rotated.
//!
//! Several brokers (the nodes of a cluster, `amqp.urls`) are one setting: every
//! connection attempt goes through the list in turn, starting after the node connected
//! to last, so a process that lost its node reconnects to another live one at once, and
//! waits with backoff only when none answers. Each attempt is bounded by
//! `amqp.connect_timeout_secs`, since a frozen node accepts the TCP connection and then
//! never answers.
//!
//! `amqps://` URLs connect over TLS (rustls with ring). The server is verified against the
//! system's native roots plus, when set, `amqp.tls_ca_file`; `amqp.tls_client_cert_file`
//! and `amqp.tls_client_key_file` give a client certificate for brokers that ask for one.
//! The files are read at every connection attempt, so renewed certificates are picked up
//! on the next reconnect. The TLS settings apply to every address of the list.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use crate::settings::{AmqpSettings, redact_url};

/// Connects, retrying with backoff until it works or `shutdown` fires (then `None`).
/// Each round tries every address of the settings ([`AmqpSettings::addresses`]) once,
/// starting after the one connected to last ([`try_connect`]): a worker that lost its
/// node goes to the next live one at once, and waits only when none answers.
pub async fn connect(
    settings: &AmqpSettings,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<Connection> {
    let max = Duration::from_secs_f64(settings.max_backoff_secs.max(0.1));
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return None,
            attempt = connect_any(settings, name) => attempt,
        };
        match attempt {
            Ok((conn, url)) => {
                tracing::info!(broker = %redact_url(url), tls = is_tls(url), "connected to the broker");
                return Some(conn);
            }
            Err((url, e)) => match refusal(url, &e.to_string()) {
                Some(why) => {
                    tracing::warn!(broker = %redact_url(url), retry_in = ?delay, "{why}; trying again, in case the password is being changed");
                }
                None => {
                    let brokers = settings.redacted_addresses();
                    tracing::warn!(%brokers, error = %e, retry_in = ?delay, "broker unreachable; waiting before trying again");
                }
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(max);
    }
}

/// Whether an error's text is the broker refusing a login: a wrong user or password
/// (`ACCESS_REFUSED - Login was refused`), no permission on the vhost or no such vhost
/// (`NOT_ALLOWED - access to vhost …`, `NOT_ALLOWED - vhost … not found`). Text, not
/// types, because the producer's pool hands errors over as text; these are RabbitMQ's
/// own reply texts.
pub fn is_refusal(error: &str) -> bool {
    error.contains("ACCESS_REFUSED - Login was refused")
        || error.contains("NOT_ALLOWED - access to vhost")
        || (error.contains("NOT_ALLOWED - vhost") && error.contains("not found"))
}

/// The operator's sentence for a refused connection attempt (see [`is_refusal`]), naming
/// the user and the vhost of `url` and never its password; `None` when `error` is not a
/// refusal (the broker is unreachable, say).
pub fn refusal(url: &str, error: &str) -> Option<String> {
    if !is_refusal(error) {
        return None;
    }
    let (user, vhost) = match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => (uri.authority.userinfo.username, uri.vhost),
        Err(_) => ("?".to_owned(), "?".to_owned()),
    };
    Some(
        if error.contains("not found") && !error.contains("Login was refused") {
            format!("the broker refused user `{user}`: vhost `{vhost}` does not exist")
        } else {
            format!(
                "the broker refused user `{user}`: wrong password or no permission on vhost `{vhost}`"
            )
        },
    )
}

/// What [`try_connect`] connects to: a bare URL (an `amqps://` one is verified against
/// the system's native roots only, without a client certificate), or the `amqp`
/// settings (every address of `amqp.urls` or `amqp.url`, each with the TLS files).
pub trait Target {
    /// The broker URLs, at least one (secrets: never log them unredacted).
    fn addresses(&self) -> Vec<&str>;
    /// The TLS configuration for an `amqps://` URL (the same for every address).
    fn tls_config(&self) -> std::io::Result<OwnedTLSConfig>;
    /// Longest wait for one connection attempt, handshake included.
    fn connect_timeout(&self) -> Duration {
        DEFAULT_CONNECT_TIMEOUT
    }
}

/// [`Target::connect_timeout`] of a bare URL (`amqp.connect_timeout_secs`' default).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Target for str {
    fn addresses(&self) -> Vec<&str> {
        vec![self]
    }
    fn tls_config(&self) -> std::io::Result<OwnedTLSConfig> {
        Ok(OwnedTLSConfig::default())
    }
}

impl Target for String {
    fn addresses(&self) -> Vec<&str> {
        vec![self]
    }
    fn tls_config(&self) -> std::io::Result<OwnedTLSConfig> {
        Ok(OwnedTLSConfig::default())
    }
}

impl Target for AmqpSettings {
    fn addresses(&self) -> Vec<&str> {
        AmqpSettings::addresses(self)
    }
    fn tls_config(&self) -> std::io::Result<OwnedTLSConfig> {
        tls_config(self)
    }
    fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs.max(0.1))
    }
}

/// The TLS configuration the `amqp` settings describe: extra trusted CA certificates
/// and a client identity from PEM files. Errors name the setting and the path, never
/// the contents.
pub fn tls_config(settings: &AmqpSettings) -> std::io::Result<OwnedTLSConfig> {
    fn read(key: &str, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("reading `amqp.{key}` ({}): {e}", path.display()),
            )
        })
    }
    let cert_chain = match &settings.tls_ca_file {
        Some(path) => Some(String::from_utf8(read("tls_ca_file", path)?).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("`amqp.tls_ca_file` ({}) is not PEM text", path.display()),
            )
        })?),
        None => None,
    };
    let identity = match (
        &settings.tls_client_cert_file,
        &settings.tls_client_key_file,
    ) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("tls_client_cert_file", cert)?,
            key: read("tls_client_key_file", key)?,
        }),
        (None, None) => None,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "`amqp.tls_client_cert_file` and `amqp.tls_client_key_file` go together: \
                 give both or neither",
            ));
        }
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

fn is_tls(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("amqps://"))
}

/// Where the next connection attempt starts in a list of addresses: just after the one
/// connected to last, process-wide. A connection is only opened again after the last one
/// was lost, most likely with its node, so that node gets its turn last; and the
/// producer's connections spread over the nodes.
static NEXT_ADDRESS: AtomicUsize = AtomicUsize::new(0);

/// One connection attempt per address of `target` (see [`Target`]), in turn from where
/// the last connection left off, each bounded by the target's connect timeout: the first
/// that connects wins. The error is a refused login if any address refused (it says
/// more than an unreachable node), else the last address's.
///
/// lapin's own auto-recovery stays off: [`crate::runtime`] reconnects itself (see its
/// module docs for why), and a publisher that loses its connection must learn it rather
/// than wait on a replay.
pub async fn try_connect<T: Target + ?Sized>(target: &T, name: &str) -> lapin::Result<Connection> {
    connect_any(target, name)
        .await
        .map(|(conn, _)| conn)
        .map_err(|(_, e)| e)
}

/// [`try_connect`], also naming the address that connected or, on error, that failed.
async fn connect_any<'a, T: Target + ?Sized>(
    target: &'a T,
    name: &str,
) -> Result<(Connection, &'a str), (&'a str, lapin::Error)> {
    let addresses = target.addresses();
    let count = addresses.len().max(1);
    let start = NEXT_ADDRESS.load(Ordering::Relaxed) % count;
    let mut failure: Option<(&str, lapin::Error)> = None;
    for k in 0..count {
        let i = (start + k) % count;
        let Some(url) = addresses.get(i).copied() else {
            break;
        };
        match connect_one(target, url, name).await {
            Ok(conn) => {
                NEXT_ADDRESS.store(i + 1, Ordering::Relaxed);
                return Ok((conn, url));
            }
            Err(e) => {
                if count > 1 {
                    tracing::warn!(broker = %redact_url(url), error = %e, "broker node unavailable; trying the next address");
                }
                let keep_earlier = failure
                    .as_ref()
                    .is_some_and(|(_, earlier)| is_refusal(&earlier.to_string()));
                if !keep_earlier {
                    failure = Some((url, e));
                }
            }
        }
    }
    Err(failure.unwrap_or_else(|| {
        (
            "",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no broker address").into(),
        )
    }))
}

/// One attempt at one address, bounded by the target's connect timeout: a frozen node
/// accepts TCP connections and never answers the handshake.
async fn connect_one<T: Target + ?Sized>(
    target: &T,
    url: &str,
    name: &str,
) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    let tls = if is_tls(url) {
        target.tls_config()?
    } else {
        OwnedTLSConfig::default()
    };
    let timeout = target.connect_timeout();
    let attempt =
        Connection::connect_with_config(url, props, tls, lapin::runtime::default_runtime()?);
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )
        .into()),
    }
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Persistent JSON message properties with the given headers.
pub fn persistent_json(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers)
}

/// Publishes and waits for the broker's confirm. `mandatory`: an unroutable message is
/// an error rather than silently dropped.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<()> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .with_context(|| format!("publishing to `{exchange}`"))?
        .await
        .with_context(|| format!("waiting for the broker to confirm a publish to `{exchange}`"))?;
    match confirm {
        lapin::Confirmation::Ack(None) => Ok(()),
        lapin::Confirmation::Ack(Some(_)) => {
            anyhow::bail!(
                "the broker could not route a message to `{exchange}` with key `{routing_key}`"
            )
        }
        other => anyhow::bail!("the broker refused a message to `{exchange}`: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RabbitMQ's reply texts as lapin renders them, through the producer's pool.
    const WRONG_PASSWORD: &str = "connecting to RabbitMQ: Error occurred while creating a new object: \
        protocol error: AMQP soft error: ACCESS-REFUSED: ACCESS_REFUSED - Login was refused \
        using authentication mechanism PLAIN. For details see the broker logfile.";
    const NO_PERMISSION: &str = "protocol error: AMQP hard error: NOT-ALLOWED: NOT_ALLOWED - \
        access to vhost '/' refused for user 'app'";
    const NO_VHOST: &str =
        "protocol error: AMQP hard error: NOT-ALLOWED: NOT_ALLOWED - vhost media not found";

    #[test]
    fn a_refused_login_names_the_user_and_vhost_but_never_the_password() {
        let url = "amqp://app:hunter2@broker:5672/%2f";
        for error in [WRONG_PASSWORD, NO_PERMISSION] {
            let said = refusal(url, error).expect("a refusal");
            assert_eq!(
                said,
                "the broker refused user `app`: wrong password or no permission on vhost `/`"
            );
        }
        let said = refusal("amqp://app:hunter2@broker/media", NO_VHOST).unwrap();
        assert_eq!(
            said,
            "the broker refused user `app`: vhost `media` does not exist"
        );
        assert!(!said.contains("hunter2"));
    }

    #[test]
    fn an_unreachable_broker_is_not_a_refusal() {
        let url = "amqp://app:hunter2@broker:5672/%2f";
        assert_eq!(
            refusal(url, "IO error: Connection refused (os error 111)"),
            None
        );
        // A refused publish is a permission problem of one operation, not of the login.
        assert_eq!(
            refusal(
                url,
                "ACCESS_REFUSED - access to exchange 'video_tasks' in vhost '/' refused"
            ),
            None
        );
    }
}
