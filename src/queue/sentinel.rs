//! Redis Sentinel: the URL form, and finding the current primary through the sentinels.
//!
//! ```text
//! redis+sentinel://[[username]:password@]host:port[,host:port...]/master-name[/db][?options]
//! rediss+sentinel://...   (TLS to the sentinels and to Redis, as rediss://)
//! ```
//!
//! The hosts are the sentinels (livekit-server's `redis.sentinel_addresses`), the first path
//! segment the master name (`redis.sentinel_master_name`); the user and password are Redis's
//! (`redis.username`, `redis.password`), and the options:
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `sentinel_username`, `sentinel_password` | the sentinels' own credentials (`redis.sentinel_username`, `redis.sentinel_password`) | none |
//! | `wait_replicas` | replicas that must acknowledge a write before it is confirmed (`WAIT`); 0 confirms on the primary's word alone | 1 |
//!
//! Asynchronous replication loses the writes a primary acknowledged but had not sent to the
//! replica Sentinel promotes. With `wait_replicas` N ≥ 1 every queue write (an enqueue, a
//! claim, a start, the dispatcher lease) is confirmed only once N replicas hold it, and a write
//! they did not acknowledge in time fails as unavailable (HTTP 503) although the primary may
//! keep it: the caller retries with the same dedup key, which finds the ticket when it was
//! kept. See the README's "Redis Sentinel" section for what remains.

use std::fmt;
use std::time::Duration;

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, TlsMode};

/// A parsed `redis+sentinel://` or `rediss+sentinel://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// The sentinels, in the order they are asked.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the primary under.
    pub master_name: String,
    /// The Redis database number.
    pub db: i64,
    /// Redis's ACL user, if any.
    pub username: Option<String>,
    /// Redis's password, if any.
    pub password: Option<String>,
    /// The sentinels' ACL user, if any.
    pub sentinel_username: Option<String>,
    /// The sentinels' password, if any.
    pub sentinel_password: Option<String>,
    /// TLS to the sentinels and to Redis.
    pub tls: bool,
    /// Replicas that must acknowledge each write.
    pub wait_replicas: u32,
}

impl fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master_name", &self.master_name)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &redact(&self.password))
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &redact(&self.sentinel_password))
            .field("tls", &self.tls)
            .field("wait_replicas", &self.wait_replicas)
            .finish()
    }
}

/// The sentinel port when a host names none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// Whether `url` uses one of the Sentinel schemes.
pub fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
}

impl SentinelUrl {
    /// Parses a Sentinel URL; the error says what is wrong, never with the password.
    pub fn parse(url: &str) -> Result<SentinelUrl, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
            (true, rest)
        } else {
            return Err("must start with redis+sentinel:// or rediss+sentinel://".to_owned());
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => {
                let (user, password) = match userinfo.split_once(':') {
                    Some((user, password)) => (user, Some(password)),
                    None => (userinfo, None),
                };
                let user = (!user.is_empty())
                    .then(|| decode(user, "the username"))
                    .transpose()?;
                let password = password
                    .filter(|password| !password.is_empty())
                    .map(|password| decode(password, "the password"))
                    .transpose()?;
                (user, password)
            }
        };
        if hosts.is_empty() {
            return Err("names no sentinel (host:port[,host:port...])".to_owned());
        }
        let sentinels = hosts
            .split(',')
            .map(parse_host)
            .collect::<Result<Vec<_>, _>>()?;
        let mut segments = path.split('/');
        let master_name = segments.next().unwrap_or_default();
        if master_name.is_empty() {
            return Err("names no master (…/master-name after the sentinels)".to_owned());
        }
        let master_name = decode(master_name, "the master name")?;
        let db = match segments.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse::<i64>()
                .ok()
                .filter(|db| *db >= 0)
                .ok_or_else(|| format!("database {db:?} is not a number"))?,
        };
        if segments.any(|segment| !segment.is_empty()) {
            return Err("has more path than /master-name/db".to_owned());
        }
        let mut parsed = SentinelUrl {
            sentinels,
            master_name,
            db,
            username,
            password,
            sentinel_username: None,
            sentinel_password: None,
            tls,
            wait_replicas: 1,
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "sentinel_username" => {
                    parsed.sentinel_username = Some(decode(value, "sentinel_username")?)
                }
                "sentinel_password" => {
                    parsed.sentinel_password = Some(decode(value, "sentinel_password")?)
                }
                "wait_replicas" => {
                    parsed.wait_replicas = value
                        .parse()
                        .map_err(|_| format!("wait_replicas {value:?} is not a number"))?
                }
                other => {
                    return Err(format!(
                        "unknown option {other:?} (sentinel_username, sentinel_password, \
                         wait_replicas)"
                    ));
                }
            }
        }
        Ok(parsed)
    }

    /// A client that asks the sentinels for the current primary.
    pub(crate) fn client(&self) -> redis::RedisResult<SentinelClient> {
        let addresses = self.sentinels.iter().map(|(host, port)| {
            if self.tls {
                ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port: *port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(host.clone(), *port)
            }
        });
        let mut builder =
            SentinelClientBuilder::new(addresses, &self.master_name, SentinelServerType::Master)?
                .set_client_to_redis_db(self.db);
        if self.tls {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        }
        if let Some(username) = &self.username {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = &self.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(username) = &self.sentinel_username {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = &self.sentinel_password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        builder.build()
    }
}

/// Asks the sentinels, in turn, for the primary of `client`'s master name, and checks that
/// the node named says it is a primary; bounded by `limit`.
pub(crate) async fn find_primary(
    client: &tokio::sync::Mutex<SentinelClient>,
    limit: Duration,
) -> redis::RedisResult<redis::Client> {
    let found = tokio::time::timeout(limit, async {
        let mut client = client.lock().await;
        client.async_get_client().await
    })
    .await;
    match found {
        Ok(found) => found,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no sentinel named a reachable primary within {limit:?}"),
        ))),
    }
}

fn parse_host(host: &str) -> Result<(String, u16), String> {
    let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
        let (name, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("sentinel {host:?} has an unclosed ["))?;
        (name, after.strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if name.is_empty() {
        return Err(format!("sentinel {host:?} has no host"));
    }
    let port = match port {
        None => DEFAULT_SENTINEL_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("sentinel {host:?} has no valid port"))?,
    };
    Ok((name.to_owned(), port))
}

/// Percent-decoding of one URL part.
fn decode(part: &str, what: &str) -> Result<String, String> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = part
                .get(index + 1..index + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| format!("{what} has a bad %-escape"))?;
            out.push(hex);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{what} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_part() {
        let url = SentinelUrl::parse(
            "rediss+sentinel://app:p%40ss@s1:26380,s2,[::1]:26381/my%20primary/3\
             ?sentinel_password=sp&sentinel_username=su&wait_replicas=2",
        )
        .unwrap();
        assert_eq!(
            url.sentinels,
            vec![
                ("s1".to_owned(), 26380),
                ("s2".to_owned(), DEFAULT_SENTINEL_PORT),
                ("::1".to_owned(), 26381)
            ]
        );
        assert_eq!(url.master_name, "my primary");
        assert_eq!(url.db, 3);
        assert_eq!(url.username.as_deref(), Some("app"));
        assert_eq!(url.password.as_deref(), Some("p@ss"));
        assert_eq!(url.sentinel_username.as_deref(), Some("su"));
        assert_eq!(url.sentinel_password.as_deref(), Some("sp"));
        assert!(url.tls);
        assert_eq!(url.wait_replicas, 2);
        assert!(!format!("{url:?}").contains("p@ss"));
    }

    #[test]
    fn defaults_and_password_only() {
        let url = SentinelUrl::parse("redis+sentinel://:secret@sentinel/mymaster").unwrap();
        assert_eq!(url.sentinels, vec![("sentinel".to_owned(), 26379)]);
        assert_eq!((url.db, url.wait_replicas, url.tls), (0, 1, false));
        assert_eq!(url.username, None);
        assert_eq!(url.password.as_deref(), Some("secret"));
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        for (url, says) in [
            ("redis://x/", "must start with"),
            ("redis+sentinel:///mymaster", "names no sentinel"),
            ("redis+sentinel://s1:26379", "names no master"),
            ("redis+sentinel://s1:26379/", "names no master"),
            ("redis+sentinel://s1:0/m", "no valid port"),
            ("redis+sentinel://s1:x/m", "no valid port"),
            ("redis+sentinel://s1,/m", "has no host"),
            ("redis+sentinel://s1/m/x", "not a number"),
            ("redis+sentinel://s1/m/0/x", "more path"),
            ("redis+sentinel://s1/m?wait_replicas=-1", "wait_replicas"),
            ("redis+sentinel://s1/m?tls=1", "unknown option"),
            ("redis+sentinel://:%zz@s1/m", "bad %-escape"),
        ] {
            let error = SentinelUrl::parse(url).unwrap_err();
            assert!(error.contains(says), "{url}: {error}");
        }
    }
}
