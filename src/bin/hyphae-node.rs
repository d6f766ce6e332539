//! `hyphae-node`: the always-on native peer. Opens (or creates) its data directory, prints its
//! identity and dialable addresses, and exchanges rooms with peers until SIGINT/SIGTERM.

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::path::PathBuf;
    use std::sync::Arc;

    use clap::Parser;
    use hyphae::api::server::WebApp;
    use hyphae::api::{ClientApi, Registration};
    use hyphae::rooms::{NodeConfig, P2pNode};
    use hyphae::store::redb::RedbStore;
    use hyphae::store::SharedStore;
    use libp2p::Multiaddr;

    /// Default listeners: TCP 4001, QUIC 4001/udp, and for browsers WebSocket 4002 and
    /// WebRTC-direct 4003/udp.
    const DEFAULT_LISTEN: [&str; 4] = [
        "/ip4/0.0.0.0/tcp/4001",
        "/ip4/0.0.0.0/udp/4001/quic-v1",
        "/ip4/0.0.0.0/tcp/4002/ws",
        "/ip4/0.0.0.0/udp/4003/webrtc-direct",
    ];

    /// A Hyphae peer: a Matrix homeserver that exchanges rooms over libp2p.
    #[derive(Parser, Debug)]
    #[command(name = "hyphae-node", version, about)]
    struct Args {
        /// Data directory: the redb store (rooms, events, identity key).
        #[arg(long, default_value = "./hyphae-data")]
        data: PathBuf,
        /// Address to listen on (repeatable). Default: TCP 4001, QUIC 4001, WebSocket 4002,
        /// WebRTC-direct 4003.
        #[arg(long = "listen", value_name = "MULTIADDR")]
        listen: Vec<Multiaddr>,
        /// Peer to dial at start and keep reconnecting to (repeatable), with its /p2p/ id.
        #[arg(long = "bootstrap", value_name = "MULTIADDR")]
        bootstrap: Vec<Multiaddr>,
        /// Do not look for peers on the local network with mDNS.
        #[arg(long)]
        no_mdns: bool,
        /// Seconds between anti-entropy rounds with connected peers.
        #[arg(long, default_value_t = 30)]
        anti_entropy_secs: u64,
        /// Where the Matrix Client-Server API listens (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8008", value_name = "ADDR")]
        http: std::net::SocketAddr,
        /// Who may register accounts: open, loopback (clients on this machine), token, closed.
        #[arg(long, default_value = "loopback", value_parser = ["open", "loopback", "token", "closed"])]
        registration: String,
        /// With `--registration loopback`, web pages of this origin (`scheme://host[:port]`) may
        /// register too; pages of other origins, open in a browser on this machine, may not
        /// (the node's own web app always may). Repeatable; comma-separated in the variable.
        #[arg(
            long = "allow-origin",
            value_name = "ORIGIN",
            env = "HYPHAE_ALLOW_ORIGIN",
            value_delimiter = ',',
            value_parser = parse_origin
        )]
        allow_origin: Vec<String>,
        /// The token `--registration token` asks for.
        #[arg(
            long,
            env = "HYPHAE_REGISTRATION_TOKEN",
            required_if_eq("registration", "token")
        )]
        registration_token: Option<String>,
        /// Print the identity and exit instead of running.
        #[arg(long)]
        print_identity: bool,
        /// Serve the built web app from this directory on the `--http` address (the page
        /// bootstraps from this node).
        #[arg(long, value_name = "DIR")]
        web: Option<PathBuf>,
    }

    pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .init();
        let args = Args::parse();
        std::fs::create_dir_all(&args.data)?;
        let store: SharedStore = Arc::new(RedbStore::open(&args.data.join("hyphae.redb"))?);
        let listen = if args.print_identity {
            Vec::new()
        } else if args.listen.is_empty() {
            DEFAULT_LISTEN
                .iter()
                .map(|a| a.parse().expect("valid default"))
                .collect()
        } else {
            args.listen.clone()
        };
        let listeners = listen.len();
        let config = NodeConfig {
            listen,
            bootstrap: args.bootstrap.clone(),
            anti_entropy_every: std::time::Duration::from_secs(args.anti_entropy_secs.max(1)),
            mdns: !args.no_mdns && !args.print_identity,
            start_offline: false,
        };
        let node = P2pNode::start(store, config).await?;
        let rooms = node.engine().rooms().await?;
        println!("server name: {}", node.server_name());
        println!("peer id:     {}", node.peer_id());
        println!("signing key: ed25519:p2p");
        println!("data:        {}", args.data.display());
        println!("rooms:       {}", rooms.len());
        if args.print_identity {
            return Ok(());
        }
        // A listener that failed (say, its port is taken) never reports an address: after a
        // few seconds print what there is rather than wait forever.
        let wait = hyphae::net::rt::Duration::from_secs(5);
        let addrs =
            match hyphae::net::rt::timeout(wait, node.listen_addrs_at_least(listeners)).await {
                Some(addrs) => addrs,
                None => node.current_listen_addrs(),
            };
        if addrs.is_empty() {
            tracing::warn!("not listening anywhere; peers can still be dialled with --bootstrap");
        }
        for addr in &addrs {
            println!("listening:   {addr}");
        }
        let http = tokio::net::TcpListener::bind(args.http).await?;
        let http_addr = http.local_addr()?;
        let url = format!("http://{http_addr}");
        let registration = match args.registration.as_str() {
            "open" => Registration::Open,
            "token" => Registration::Token(args.registration_token.clone().unwrap_or_default()),
            "closed" => Registration::Closed,
            _ => {
                let mut web_origins = hyphae::api::server::own_origins(http_addr);
                web_origins.extend(args.allow_origin.iter().cloned());
                Registration::Loopback { web_origins }
            }
        };
        let api = ClientApi::start(node.clone(), registration)
            .await
            .map_err(|e| e.message)?;
        println!("client api:  {url}");
        let web = args.web.as_ref().map(|dir| WebApp {
            dir: dir.clone(),
            bootstrap: serde_json::json!({
                "server_name": node.server_name().to_string(),
                "peer_id": node.peer_id().to_string(),
                "addrs": browser_addrs(&addrs),
            }),
        });
        if web.is_some() {
            println!("web app:     {url}/");
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(hyphae::api::server::serve(api, http, web, async {
            let _ = stop_rx.await;
        }));
        tracing::info!("running; press Ctrl-C to stop");
        // A node whose swarm stopped (a panic, logged above) answers its clients only with
        // errors: exit with an error so that whatever runs the node starts it again.
        let failed = tokio::select! {
            _ = shutdown_signal() => false,
            _ = node.stopped() => true,
        };
        if failed {
            tracing::error!("the node has stopped; shutting down");
        } else {
            tracing::info!("shutting down");
        }
        let _ = stop_tx.send(());
        // Open long-polls end at their timeout at the latest; don't wait for them.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server).await;
        // Dropping the last handle stops the swarm; redb closes when the engine is dropped.
        drop(node);
        if failed {
            return Err("the node stopped".into());
        }
        Ok(())
    }

    /// An origin as browsers send it: `scheme://host[:port]`, nothing after.
    fn parse_origin(s: &str) -> Result<String, String> {
        let origin = hyphae::api::normalise_origin(s);
        let well_formed = origin.split_once("://").is_some_and(|(scheme, rest)| {
            !scheme.is_empty() && !rest.is_empty() && !rest.contains(['/', '?', '#'])
        });
        if well_formed {
            Ok(origin)
        } else {
            Err(format!(
                "{s:?} is not an origin (scheme://host[:port], e.g. http://localhost:3000)"
            ))
        }
    }

    /// The addresses a page can dial: WebSocket and WebRTC-direct (browsers speak neither raw
    /// TCP nor QUIC), loopback first so a page on this machine picks a local one.
    fn browser_addrs(addrs: &[Multiaddr]) -> Vec<String> {
        use libp2p::multiaddr::Protocol;
        let mut list: Vec<&Multiaddr> = addrs
            .iter()
            .filter(|a| {
                a.iter()
                    .any(|p| matches!(p, Protocol::Ws(_) | Protocol::WebRTCDirect))
            })
            .collect();
        list.sort_by_key(|a| {
            !a.iter()
                .any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_loopback()))
        });
        list.iter().map(|a| a.to_string()).collect()
    }

    async fn shutdown_signal() {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    native::main().await
}

#[cfg(target_arch = "wasm32")]
fn main() {}
