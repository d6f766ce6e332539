//! Helpers for driving `hyphae-node` with matrix-rust-sdk: start nodes, register accounts, run
//! sliding sync (MSC4186) and wait, with a time limit, for what the SDK observes.

use std::{
    future::Future,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    pin::Pin,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use futures_util::{Stream, StreamExt};
use matrix_sdk::{
    config::RequestConfig,
    ruma::{
        api::client::{
            account::register::v3::Request as RegistrationRequest,
            room::create_room,
            uiaa::{self, AuthType},
        },
        assign, OwnedUserId,
    },
    sliding_sync::VersionBuilder,
    Client, Room,
};
use matrix_sdk_ui::{
    eyeball_im::{Vector, VectorDiff},
    room_list_service::{
        filters::new_filter_non_left, RoomList, RoomListDynamicEntriesController, RoomListItem,
    },
    sync_service::{self, SyncService},
    timeline::{Timeline, TimelineItem},
    RoomListService,
};
use tempfile::TempDir;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{sleep_until, timeout_at, Instant},
};

/// How long a node may take to print its addresses.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for something to come through one node.
pub const LOCAL: Duration = Duration::from_secs(30);
/// How long to wait for something that travels between two nodes over libp2p.
pub const REMOTE: Duration = Duration::from_secs(60);

pub const PASSWORD: &str = "correct horse battery staple";

/// The main project's root: this crate lives in its `tests/rust-sdk`.
pub fn project_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(Path::parent)
        .expect("the crate sits two directories below the project root")
        .to_owned()
}

/// `$HYPHAE_NODE_BIN`, relative to the project root, or the debug build.
fn node_binary() -> Result<PathBuf> {
    let bin =
        std::env::var_os("HYPHAE_NODE_BIN").unwrap_or_else(|| "target/debug/hyphae-node".into());
    let bin = project_root().join(bin);
    ensure!(
        bin.is_file(),
        "no hyphae-node binary at {} (build it, or set HYPHAE_NODE_BIN)",
        bin.display()
    );
    Ok(bin)
}

/// A running `hyphae-node` on loopback with a fresh data directory, killed when dropped.
pub struct Node {
    pub name: String,
    /// The Client-Server API, without a trailing slash.
    pub url: String,
    pub server_name: String,
    pub peer_id: String,
    /// Its libp2p listen addresses, as printed.
    pub listen: Vec<String>,
    child: Child,
    // Declared after `child`: removed once the node is gone (see `Drop`).
    _data: TempDir,
}

impl Node {
    /// Starts a node that dials `bootstrap` (multiaddrs with `/p2p/`) and returns once it has
    /// printed its client API URL and at least one listen address.
    pub async fn start(name: &str, bootstrap: &[String]) -> Result<Node> {
        let bin = node_binary()?;
        let data = tempfile::Builder::new()
            .prefix("hyphae-rust-sdk-test-")
            .tempdir()?;
        let mut command = Command::new(&bin);
        command
            .current_dir(project_root())
            .arg("--data")
            .arg(data.path())
            .args(["--no-mdns", "--http", "127.0.0.1:0"])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--registration", "open"]);
        for addr in bootstrap {
            command.args(["--bootstrap", addr]);
        }
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
        let mut child = command
            .env("RUST_LOG", log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("{name}: could not start {}", bin.display()))?;

        let (lines_tx, mut lines) = mpsc::unbounded_channel();
        forward(name, child.stdout.take().expect("piped"), Some(lines_tx));
        forward(name, child.stderr.take().expect("piped"), None);

        // From here on an early return kills the child.
        let mut node = Node {
            name: name.to_owned(),
            url: String::new(),
            server_name: String::new(),
            peer_id: String::new(),
            listen: Vec::new(),
            child,
            _data: data,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while node.url.is_empty() || node.listen.is_empty() {
            let line = match timeout_at(deadline, lines.recv()).await {
                Err(_) => bail!("{name}: not ready within {READY_TIMEOUT:?} (its output is above)"),
                Ok(None) => {
                    let status = node.child.wait()?;
                    bail!("{name}: exited ({status}) before it was ready (its output is above)");
                }
                Ok(Some(line)) => line,
            };
            let Some((key, value)) = parse_announcement(&line) else {
                continue;
            };
            match key {
                "server name" => node.server_name = value.to_owned(),
                "peer id" => node.peer_id = value.to_owned(),
                "listening" => node.listen.push(value.to_owned()),
                "client api" => node.url = value.trim_end_matches('/').to_owned(),
                _ => {}
            }
        }
        ensure!(
            !node.server_name.is_empty(),
            "{name}: printed no server name"
        );
        Ok(node)
    }

    /// An address other nodes can `--bootstrap` from: the first listen address, with the peer id.
    pub fn dial_addr(&self) -> String {
        let addr = &self.listen[0];
        if addr.contains("/p2p/") {
            addr.clone()
        } else {
            format!("{addr}/p2p/{}", self.peer_id)
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key:   value` lines the node prints at start (`server name`, `peer id`, `listening`, `client
/// api`, `web app`).
fn parse_announcement(line: &str) -> Option<(&str, &str)> {
    let (key, rest) = line.trim_end().split_once(':')?;
    let value = rest.trim_start();
    let known = [
        "server name",
        "peer id",
        "listening",
        "client api",
        "web app",
    ];
    let well_formed = known.contains(&key)
        && rest.starts_with(char::is_whitespace)
        && !value.is_empty()
        && !value.contains(char::is_whitespace);
    well_formed.then_some((key, value))
}

/// Copies the node's output, line by line, to this test's stderr (shown when the test fails) and
/// to `lines`.
fn forward(
    name: &str,
    from: impl Read + Send + 'static,
    lines: Option<mpsc::UnboundedSender<String>>,
) {
    let name = name.to_owned();
    // A std thread inherits the test's output capture.
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{name}] {line}");
            if let Some(lines) = &lines {
                let _ = lines.send(line);
            }
        }
    });
}

/// A client for `node`, set up as an app using sliding sync would be: it discovers simplified
/// sliding sync from `/versions` (`org.matrix.simplified_msc3575`), so building fails if the node
/// does not advertise it.
pub async fn client(node: &Node) -> Result<Client> {
    Client::builder()
        .homeserver_url(&node.url)
        .sliding_sync_version_builder(VersionBuilder::DiscoverNative)
        .request_config(RequestConfig::short_retry())
        .build()
        .await
        .with_context(|| format!("{}: building a client for {}", node.name, node.url))
}

/// Registers `username` on `node` the way matrix-rust-sdk's integration tests do: an empty request
/// to learn the flows, then `m.login.dummy` with no session. Returns the logged-in client.
pub async fn register(node: &Node, username: &str) -> Result<Client> {
    let client = client(node).await?;
    let auth = client.matrix_auth();
    match auth.register(RegistrationRequest::new()).await {
        Ok(response) => bail!(
            "{}: a registration with no username and no auth succeeded (as {})",
            node.name,
            response.user_id
        ),
        Err(error) => {
            let info = error.as_uiaa_response().ok_or_else(|| {
                anyhow!(
                    "{}: expected a 401 with UIAA flows, got: {error}",
                    node.name
                )
            })?;
            ensure!(
                info.flows
                    .iter()
                    .any(|flow| flow.stages == [AuthType::Dummy]),
                "{}: registration offers no m.login.dummy flow: {:?}",
                node.name,
                info.flows
            );
        }
    }
    let request = assign!(RegistrationRequest::new(), {
        username: Some(username.to_owned()),
        password: Some(PASSWORD.to_owned()),
        auth: Some(uiaa::AuthData::Dummy(uiaa::Dummy::new())),
    });
    let response = auth
        .register(request)
        .await
        .with_context(|| format!("{}: registering {username}", node.name))?;
    let expected = format!("@{username}:{}", node.server_name);
    ensure!(
        response.user_id.as_str() == expected,
        "registered as {}, expected {expected}",
        response.user_id
    );
    ensure!(
        client.user_id() == Some(&*response.user_id),
        "the client is logged in as {expected} after registering"
    );
    Ok(client)
}

/// Creates a room named `name`, inviting `invite`, with the node's defaults for everything else.
pub async fn create_room(client: &Client, name: &str, invite: &[OwnedUserId]) -> Result<Room> {
    let request = assign!(create_room::v3::Request::new(), {
        name: Some(name.to_owned()),
        invite: invite.to_vec(),
    });
    client
        .create_room(request)
        .await
        .with_context(|| format!("creating the room {name:?}"))
}

/// Sliding sync running in the background for one client; it is the only way that client
/// syncs (no `/v3/sync`).
pub struct Syncing {
    who: String,
    room_list: Arc<RoomListService>,
    /// Set once the sync has failed or stopped.
    failure: watch::Receiver<Option<String>>,
    // Kept for as long as this runs.
    _service: Option<SyncService>,
    task: JoinHandle<()>,
}

impl Syncing {
    /// The room list's connection alone (`conn_id` "room-list": lists, room subscriptions and
    /// the account data, receipts and typing extensions).
    pub async fn room_list(client: &Client) -> Result<Self> {
        let room_list = Arc::new(RoomListService::new(client.clone()).await?);
        let (failed, failure) = watch::channel(None);
        let task = tokio::spawn({
            let room_list = room_list.clone();
            async move {
                let sync = room_list.sync();
                futures_util::pin_mut!(sync);
                while let Some(result) = sync.next().await {
                    if let Err(error) = result {
                        let _ = failed.send(Some(format!("the room list sync failed: {error:#}")));
                        return;
                    }
                }
                let _ = failed.send(Some("the room list sync stopped".to_owned()));
            }
        });
        Ok(Self {
            who: who(client),
            room_list,
            failure,
            _service: None,
            task,
        })
    }

    /// What Element X runs: the room list's connection plus the "encryption" one, which carries
    /// the to-device and e2ee extensions.
    pub async fn sync_service(client: &Client) -> Result<Self> {
        let service = SyncService::builder(client.clone()).build().await?;
        let mut state = service.state();
        service.start().await;
        let (failed, failure) = watch::channel(None);
        let task = tokio::spawn(async move {
            while let Some(state) = state.next().await {
                let why = match state {
                    sync_service::State::Error(error) => {
                        format!("the sync service failed: {error:#}")
                    }
                    sync_service::State::Terminated => "the sync service stopped".to_owned(),
                    sync_service::State::Offline => "the sync service went offline".to_owned(),
                    sync_service::State::Idle | sync_service::State::Running => continue,
                };
                let _ = failed.send(Some(why));
                return;
            }
        });
        Ok(Self {
            who: who(client),
            room_list: service.room_list_service(),
            failure,
            _service: Some(service),
            task,
        })
    }

    pub fn room_list_service(&self) -> &RoomListService {
        &self.room_list
    }

    /// Resolves with the reason once the sync has failed or stopped.
    async fn failure(&self) -> String {
        let mut failure = self.failure.clone();
        let why = match failure.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the sync task ended".to_owned(),
        };
        why
    }

    /// Awaits `fut` for at most `limit`, failing early if the sync fails.
    pub async fn within<T>(
        &self,
        what: &str,
        limit: Duration,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let who = &self.who;
        tokio::select! {
            result = tokio::time::timeout(limit, fut) => match result {
                Ok(result) => result.with_context(|| format!("{who}: waiting for {what}")),
                Err(_) => bail!("{who}: timed out after {limit:?} waiting for {what}"),
            },
            why = self.failure() => bail!("{who}: {why}, while waiting for {what}"),
        }
    }
}

impl Drop for Syncing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn who(client: &Client) -> String {
    client
        .user_id()
        .map_or_else(|| "(logged out)".to_owned(), ToString::to_string)
}

type Updates<'a, T> = Pin<Box<dyn Stream<Item = Vec<VectorDiff<T>>> + 'a>>;

/// A list the SDK keeps up to date (the room list, a timeline), as last seen.
pub struct Live<'a, T: Clone> {
    items: Vector<T>,
    updates: Updates<'a, T>,
    show: fn(&T) -> String,
}

impl<'a, T: Clone> Live<'a, T> {
    pub fn new(
        items: Vector<T>,
        updates: impl Stream<Item = Vec<VectorDiff<T>>> + 'a,
        show: fn(&T) -> String,
    ) -> Self {
        Self {
            items,
            updates: Box::pin(updates),
            show,
        }
    }

    /// Applies updates until `done` gives a value, for at most `limit`; fails early if `sync`
    /// fails. A failure shows the items as last seen.
    pub async fn until<U>(
        &mut self,
        sync: &Syncing,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&Vector<T>) -> Option<U>,
    ) -> Result<U> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(value) = done(&self.items) {
                return Ok(value);
            }
            tokio::select! {
                diffs = self.updates.next() => match diffs {
                    Some(diffs) => diffs.into_iter().for_each(|diff| diff.apply(&mut self.items)),
                    None => bail!("{}: the updates ended while waiting for {what}; seen: {}", sync.who, self.seen()),
                },
                _ = sleep_until(deadline) => {
                    bail!("{}: timed out after {limit:?} waiting for {what}; seen: {}", sync.who, self.seen())
                }
                why = sync.failure() => bail!("{}: {why}, while waiting for {what}; seen: {}", sync.who, self.seen()),
            }
        }
    }

    fn seen(&self) -> String {
        let items: Vec<String> = self.items.iter().map(self.show).collect();
        format!("[{}]", items.join(", "))
    }
}

/// The room list as an app shows it (all rooms but those left, sorted by the SDK: most recent
/// activity first, then by name). Keep the controller alive as long as the list is watched.
pub fn watch_rooms(list: &RoomList) -> (Live<'_, RoomListItem>, RoomListDynamicEntriesController) {
    let (updates, controller) = list.entries_with_dynamic_adapters(50);
    // Nothing comes through before a filter is set.
    controller.set_filter(Box::new(new_filter_non_left()));
    let show = |room: &RoomListItem| {
        format!(
            "{} {:?} {:?} recency={:?}",
            room.room_id(),
            room.name(),
            room.state(),
            room.recency_stamp()
        )
    };
    (Live::new(Vector::new(), updates, show), controller)
}

/// A timeline's items, kept up to date.
pub async fn watch_timeline(timeline: &Timeline) -> Live<'static, Arc<TimelineItem>> {
    let (items, updates) = timeline.subscribe().await;
    let show = |item: &Arc<TimelineItem>| match item.as_event() {
        Some(event) => match event.content().as_message() {
            Some(message) => format!("{}: {:?}", event.sender(), message.body()),
            None => format!("{}: (not a message)", event.sender()),
        },
        None => "(virtual item)".to_owned(),
    };
    Live::new(items, updates, show)
}

/// Whether `items` hold a message from `sender` with this `body`.
pub fn has_message(items: &Vector<Arc<TimelineItem>>, sender: &str, body: &str) -> bool {
    items.iter().any(|item| {
        item.as_event().is_some_and(|event| {
            event.sender().as_str() == sender
                && event
                    .content()
                    .as_message()
                    .is_some_and(|message| message.body() == body)
        })
    })
}
