//! Where a webhook may go, and the one way a message gets there.
//!
//! A tenant admin names the URL, so the broker must not become their way
//! into the cluster (SSRF): loopback, link-local (cloud metadata at
//! 169.254.169.254), private (RFC 1918, RFC 4193), CGNAT, multicast,
//! broadcast and unspecified addresses are refused, in every spelling the
//! URL parser accepts (decimal, octal and hex IPv4, IPv4-mapped IPv6), at
//! SetWebhook and again at every delivery, after DNS resolution. The
//! delivery then connects to exactly the addresses it checked (a rebinding
//! DNS answer between check and connect changes nothing), speaks HTTP/1.1
//! itself over that connection (no proxy from the environment, no
//! redirect followed), and sends only to https unless `webhooks.allow_http`.
//! Operators open internal receivers with `webhooks.allow_networks` (CIDRs)
//! or `webhooks.allow_hosts` (exact host names).
//!
//! Name resolution and dialing are ports ([`Resolve`], [`Connect`]), so the
//! tests prove a refusal without sending a packet anywhere.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::net::TcpStream;

/// Which webhook targets are allowed.
#[derive(Clone, Debug, Default)]
pub struct TargetPolicy {
    /// Plain `http://` allowed (default: https only).
    pub allow_http: bool,
    /// Networks allowed although internal (an in-cluster receiver).
    pub allow_networks: Vec<IpNet>,
    /// Host names allowed whatever they resolve to (exact, lowercase).
    pub allow_hosts: BTreeSet<String>,
}

/// Why a URL or an address is refused: safe to show (the host, never the
/// path or query, which may carry a receiver's secret).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// The policy with the resolver it checks names through: what SetWebhook
/// and every delivery ask.
pub struct Targets {
    /// What is allowed.
    pub policy: TargetPolicy,
    /// How names are resolved.
    pub resolver: Arc<dyn Resolve>,
}

impl Targets {
    /// Checks `url` (see [`TargetPolicy::check`]).
    ///
    /// # Errors
    /// A refusal saying why.
    pub async fn check(&self, url: &str) -> Result<Target, Refusal> {
        self.policy.check(url, self.resolver.as_ref()).await
    }
}

/// How webhooks reach the network: name resolution and dialing.
#[derive(Clone)]
pub struct WebhookNet {
    /// Resolves receivers' names.
    pub resolver: Arc<dyn Resolve>,
    /// Opens connections to checked addresses.
    pub connect: Arc<dyn Connect>,
}

impl Default for WebhookNet {
    /// The system resolver and direct connections.
    fn default() -> Self {
        Self {
            resolver: Arc::new(SystemResolver),
            connect: Arc::new(DirectConnect),
        }
    }
}

#[async_trait]
impl crate::broker::ports::WebhookTargets for Targets {
    async fn check(&self, url: &str) -> Result<crate::broker::ports::CheckedUrl, String> {
        let target = Targets::check(self, url).await.map_err(|r| r.0)?;
        Ok(crate::broker::ports::CheckedUrl {
            host: target.url.host_str().unwrap_or("").to_owned(),
            shown: masked(&target.url),
        })
    }
}

/// A checked destination: the URL and the addresses to dial.
#[derive(Clone, Debug)]
pub struct Target {
    /// The parsed URL.
    pub url: url::Url,
    /// Addresses checked against the policy; only these are dialed.
    pub addrs: Vec<SocketAddr>,
}

/// Name resolution (a port, so tests resolve names without DNS).
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    /// Every address `host` resolves to, with `port`.
    ///
    /// # Errors
    /// When the name does not resolve.
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver.
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// Opening a TCP connection (a port, so tests record the address instead
/// of dialing it).
#[async_trait]
pub trait Connect: Send + Sync + 'static {
    /// A connection to `addr`.
    ///
    /// # Errors
    /// When it cannot be opened.
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream>;
}

/// Dials the address given.
pub struct DirectConnect;

#[async_trait]
impl Connect for DirectConnect {
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        TcpStream::connect(addr).await
    }
}

/// The range an address belongs to when it is one a webhook may not reach
/// by default, by name; `None` for a public address.
pub fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => {
            // ::ffff:a.b.c.d reaches a.b.c.d.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_range(v4).map(|_| "IPv4-mapped internal");
            }
            let s = v6.segments();
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("unique local (RFC 4193)")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
                // ::a.b.c.d, the deprecated IPv4-compatible form.
                Some("IPv4-compatible")
            } else if s[0] == 0x64 && s[1] == 0xff9b {
                // NAT64 (64:ff9b::/96) embeds an IPv4 address.
                v4_range(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ))
                .map(|_| "NAT64 of an internal address")
            } else {
                None
            }
        }
    }
}

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata)")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("shared address space (CGNAT)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || o[0] >= 240 {
        Some("reserved or broadcast")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments")
    } else {
        None
    }
}

pub use credbroker_proto::masked;

impl TargetPolicy {
    /// The policy `webhooks.*` describes.
    pub fn from_config(c: &crate::webhook::WebhookConfig) -> Self {
        Self {
            allow_http: c.allow_http,
            allow_networks: c.allow_networks.clone(),
            allow_hosts: c
                .allow_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Checks one address (the allow-list first).
    ///
    /// # Errors
    /// A refusal naming the range.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        if self.allow_networks.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match internal_range(ip) {
            None => Ok(()),
            Some(range) => Err(Refusal(format!(
                "{host} is (or resolves to) {ip}, a {range} address; webhooks go to public receivers \
                 (an operator can allow an internal one with webhooks.allow_networks or webhooks.allow_hosts)"
            ))),
        }
    }

    /// Parses and checks `url`, resolving its host: the target to dial.
    ///
    /// # Errors
    /// A refusal saying why (scheme, credentials, an internal address, a
    /// name that does not resolve).
    pub async fn check(&self, url: &str, resolver: &dyn Resolve) -> Result<Target, Refusal> {
        let bad = |why: &str| Err(Refusal(why.to_owned()));
        if url.len() > 2048 {
            return bad("must be at most 2048 bytes");
        }
        let Ok(parsed) = url::Url::parse(url) else {
            return bad("not a URL");
        };
        match parsed.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return bad(
                    "must be https (plain http only where an operator set webhooks.allow_http)",
                );
            }
            _ => return bad("must be an https URL"),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return bad("must not carry credentials");
        }
        let port = parsed.port_or_known_default().unwrap_or(443);
        let addrs = match parsed.host() {
            None => return bad("must have a host"),
            // The URL parser has already turned every IPv4 spelling
            // (2130706433, 0177.0.0.1, 0x7f.0.0.1) into its address.
            Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
            Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
            Some(url::Host::Domain(name)) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if name == "localhost" || name.ends_with(".localhost") {
                    return bad("localhost is not a webhook receiver");
                }
                let addrs = resolver.resolve(&name, port).await.map_err(|_| {
                    Refusal(format!(
                        "{name} does not resolve; check the host name (nothing was stored)"
                    ))
                })?;
                if addrs.is_empty() {
                    return Err(Refusal(format!("{name} resolves to no address")));
                }
                if self.allow_hosts.contains(&name) {
                    return Ok(Target { url: parsed, addrs });
                }
                addrs
            }
        };
        let host = parsed.host_str().unwrap_or("");
        for a in &addrs {
            self.check_ip(host, a.ip())?;
        }
        Ok(Target { url: parsed, addrs })
    }
}

/// How a message is sent.
pub struct Sender {
    /// Dials the checked addresses.
    pub connect: Arc<dyn Connect>,
    /// TLS for https receivers.
    pub tls: tokio_rustls::TlsConnector,
    /// Whole-attempt timeout.
    pub timeout: Duration,
}

impl Sender {
    /// A sender with the platform's trust roots.
    ///
    /// # Errors
    /// When the platform's roots cannot be loaded.
    pub fn new(connect: Arc<dyn Connect>, timeout: Duration) -> Result<Self, String> {
        use rustls_platform_verifier::ConfigVerifierExt as _;
        let tls = rustls::ClientConfig::with_platform_verifier()
            .map_err(|e| format!("webhook TLS roots: {e}"))?;
        Ok(Self {
            connect,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            timeout,
        })
    }

    /// POSTs `body` with `headers` to `target`, trying its addresses in
    /// turn; returns the HTTP status. Never follows a redirect.
    ///
    /// # Errors
    /// A short reason safe to store (no body, no URL path).
    pub async fn post(
        &self,
        target: &Target,
        headers: &[(&'static str, String)],
        body: String,
    ) -> Result<u16, String> {
        tokio::time::timeout(self.timeout, self.post_inner(target, headers, body))
            .await
            .map_err(|_| "timeout".to_owned())?
    }

    async fn post_inner(
        &self,
        target: &Target,
        headers: &[(&'static str, String)],
        body: String,
    ) -> Result<u16, String> {
        let mut stream = None;
        for addr in &target.addrs {
            if let Ok(s) = self.connect.connect(*addr).await {
                stream = Some(s);
                break;
            }
        }
        let stream = stream.ok_or_else(|| "connection refused or unreachable".to_owned())?;
        let url = &target.url;
        let host = url.host_str().unwrap_or("");
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let mut req = hyper::Request::post(path).header(hyper::header::HOST, authority);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|_| "the request could not be built".to_owned())?;
        if url.scheme() == "https" {
            let name = rustls_pki_types::ServerName::try_from(
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            )
            .map_err(|_| "the host is not a valid TLS name".to_owned())?;
            let tls = self
                .tls
                .connect(name, stream)
                .await
                .map_err(|_| "TLS handshake failed".to_owned())?;
            send(tls, req).await
        } else {
            send(stream, req).await
        }
    }
}

async fn send<S>(io: S, req: hyper::Request<Full<bytes::Bytes>>) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|_| "HTTP handshake failed".to_owned())?;
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|_| "request failed".to_owned());
    conn.abort();
    Ok(resp?.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_are_named_and_public_addresses_pass() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "64:ff9b::a9fe:a9fe",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(internal_range(ip).is_some(), "{ip} must be refused");
        }
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "100.128.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(internal_range(ip), None, "{ip} is public");
        }
    }
}
