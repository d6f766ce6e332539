//! A `hyphae-node` in its own process, on a fresh data directory, reached as any client or peer
//! would: its printed addresses and its Client-Server API over plain HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use libp2p::{Multiaddr, PeerId};
use serde_json::Value;

use super::client::Transport;

pub struct NodeProcess {
    child: Child,
    /// The data directory, when this process owns it (see [`NodeProcess::start_in`]).
    _data: Option<tempfile::TempDir>,
    /// `host:port` of the client API.
    pub http: String,
    /// Its TCP listen address (with `/p2p/<id>`).
    pub tcp: Multiaddr,
    pub peer_id: PeerId,
}

impl NodeProcess {
    /// Starts the binary Cargo built for this test and waits until it prints its addresses.
    pub fn start(binary: &str) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut node = Self::start_in(binary, data.path());
        node._data = Some(data);
        node
    }

    /// [`NodeProcess::start`] on a data directory the caller keeps (a restart reuses it).
    pub fn start_in(binary: &str, data: &std::path::Path) -> Self {
        let mut child = Command::new(binary)
            .args(["--data", data.to_str().unwrap()])
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--http",
                "127.0.0.1:0",
                "--no-mdns",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("hyphae-node starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut tcp, mut http) = (None, None);
        while http.is_none() {
            let line = lines
                .next()
                .expect("hyphae-node prints its addresses")
                .unwrap();
            if let Some(addr) = line.strip_prefix("listening:") {
                tcp = Some(addr.trim().parse::<Multiaddr>().unwrap());
            } else if let Some(url) = line.strip_prefix("client api:") {
                http = Some(url.trim().trim_start_matches("http://").to_owned());
            }
        }
        let tcp = tcp.expect("a TCP listen address");
        let peer_id = tcp
            .iter()
            .find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            })
            .unwrap();
        NodeProcess {
            child,
            _data: None,
            http: http.unwrap(),
            tcp,
            peer_id,
        }
    }
}

impl NodeProcess {
    /// Ends the process with SIGKILL: no shutdown, and nothing of it runs afterwards (the
    /// kernel's page cache survives, so this tests what the process does, not the disk).
    pub fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// [`Transport::call`] that reports a connection the node dropped or refused instead of
    /// failing the test (for requests racing a kill).
    pub async fn try_call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> std::io::Result<(u16, Value)> {
        try_call_at(self.http.clone(), method, path, token, body).await
    }
}

/// [`NodeProcess::try_call`] to the client API at `host`, wherever its process is now.
pub async fn try_call_at(
    host: String,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> std::io::Result<(u16, Value)> {
    let (method, path) = (method.to_owned(), path.to_owned());
    let token = token.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        try_http_call(&host, &method, &path, token.as_deref(), body)
    })
    .await
    .unwrap()
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request per connection (`Connection: close`).
fn http_call(
    host: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    try_http_call(host, method, path, token, body).unwrap()
}

fn try_http_call(
    host: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> std::io::Result<(u16, Value)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut stream = TcpStream::connect(host)?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let status = raw
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no status line"))?;
    let json = raw
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    Ok((status, json))
}

impl Transport for NodeProcess {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (host, method, path) = (self.http.clone(), method.to_owned(), path.to_owned());
        let token = token.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            http_call(&host, &method, &path, token.as_deref(), body)
        })
        .await
        .unwrap()
    }
}
