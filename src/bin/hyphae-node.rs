//! `hyphae-node`: the always-on native peer. For now it opens (or creates) its data directory,
//! prints its identity, and runs until SIGINT/SIGTERM, closing the store cleanly.

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::path::PathBuf;
    use std::sync::Arc;

    use clap::Parser;
    use hyphae::engine::Engine;
    use hyphae::identity::Identity;
    use hyphae::store::redb::RedbStore;
    use hyphae::store::SharedStore;

    /// A Hyphae peer: a Matrix homeserver that exchanges rooms over libp2p.
    #[derive(Parser, Debug)]
    #[command(name = "hyphae-node", version, about)]
    struct Args {
        /// Data directory: the redb store (rooms, events, identity key).
        #[arg(long, default_value = "./hyphae-data")]
        data: PathBuf,
        /// Print the identity and exit instead of running.
        #[arg(long)]
        print_identity: bool,
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
        let engine = Engine::open(store.clone()).await?;
        let identity = Identity::load_or_create(store.as_ref()).await?;
        let rooms = engine.rooms().await?;
        println!("server name: {}", identity.server_name());
        println!("peer id:     {}", identity.peer_id());
        println!("signing key: ed25519:p2p");
        println!("data:        {}", args.data.display());
        println!("rooms:       {}", rooms.len());
        if args.print_identity {
            return Ok(());
        }
        tracing::info!("running; press Ctrl-C to stop");
        shutdown_signal().await;
        tracing::info!("shutting down");
        drop(engine);
        drop(store);
        Ok(())
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
