//! matrix-rust-sdk's sliding sync services (the room list, timelines, the to-device and typing
//! extensions) against real `hyphae-node`s. Each test starts its own nodes with fresh data.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context as _, Result};
use hyphae_rust_sdk_tests::{
    create_room, has_message, register, watch_rooms, watch_timeline, Node, Syncing, LOCAL, REMOTE,
};
use matrix_sdk::{
    ruma::{
        api::client::to_device::send_event_to_device,
        events::{room::message::RoomMessageEventContent, AnyToDeviceEvent},
        serde::Raw,
        to_device::DeviceIdOrAllDevices,
        OwnedRoomId, RoomId, TransactionId,
    },
    RoomState,
};
use matrix_sdk_ui::{room_list_service::RoomListLoadingState, timeline::RoomExt as _};
use serde_json::json;
use tokio::sync::{broadcast::error::RecvError, mpsc};

#[tokio::test(flavor = "multi_thread")]
async fn room_list_sorted_by_activity_one_node() -> Result<()> {
    let node = Node::start("node", &[]).await?;
    let alice = register(&node, "alice").await?;
    let alice_id = alice.user_id().context("alice is logged in")?.to_owned();

    // Created in this order, then "zulu" is written in: by activity the list is zulu, mike,
    // alpha, which is neither the creation order nor the names' order, so only the server's
    // recency data (bump_stamp, latest events) can produce it.
    let zulu = create_room(&alice, "zulu", &[]).await?;
    let alpha = create_room(&alice, "alpha", &[]).await?;
    let mike = create_room(&alice, "mike", &[]).await?;
    zulu.send(RoomMessageEventContent::text_plain("zulu is busy again"))
        .await?;

    let alice_sync = Syncing::room_list(&alice).await?;
    let list = alice_sync.room_list_service().all_rooms().await?;
    let (mut rooms, _controller) = watch_rooms(&list);
    let expected: Vec<(OwnedRoomId, Option<String>)> =
        [(&zulu, "zulu"), (&mike, "mike"), (&alpha, "alpha")]
            .into_iter()
            .map(|(room, name)| (room.room_id().to_owned(), Some(name.to_owned())))
            .collect();
    rooms
        .until(
            &alice_sync,
            "her 3 rooms, named, most recently active first",
            LOCAL,
            |items| {
                let seen: Vec<_> = items
                    .iter()
                    .map(|room| (room.room_id().to_owned(), room.name()))
                    .collect();
                (seen == expected).then_some(())
            },
        )
        .await?;
    // The list's `count` comes from the server.
    let mut loading = list.loading_state();
    alice_sync
        .within("the list to count 3 rooms", LOCAL, async {
            loop {
                if let RoomListLoadingState::Loaded {
                    maximum_number_of_rooms: Some(3),
                } = loading.get()
                {
                    return Ok(());
                }
                loading
                    .next()
                    .await
                    .context("the loading state went away")?;
            }
        })
        .await?;

    // bob, on the same node, sees the invite through sliding sync, joins, and reads alice's
    // message in a subscribed room's timeline.
    let bob = register(&node, "bob").await?;
    let bob_id = bob.user_id().context("bob is logged in")?.to_owned();
    zulu.invite_user_by_id(&bob_id).await?;
    let bob_sync = Syncing::room_list(&bob).await?;
    let bob_list = bob_sync.room_list_service().all_rooms().await?;
    let (mut bob_rooms, _bob_controller) = watch_rooms(&bob_list);
    bob_rooms
        .until(&bob_sync, "the invite to zulu", LOCAL, |items| {
            items
                .iter()
                .any(|room| room.room_id() == zulu.room_id() && room.state() == RoomState::Invited)
                .then_some(())
        })
        .await?;
    let bob_zulu = bob.join_room_by_id(zulu.room_id()).await?;
    bob_sync
        .room_list_service()
        .subscribe_to_rooms(&[zulu.room_id()])
        .await;
    let timeline = bob_zulu.timeline().await?;
    let mut items = watch_timeline(&timeline).await;
    zulu.send(RoomMessageEventContent::text_plain("hello bob"))
        .await?;
    items
        .until(
            &bob_sync,
            "alice's message in his timeline",
            LOCAL,
            |items| has_message(items, alice_id.as_str(), "hello bob").then_some(()),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn to_device_and_typing_through_extensions() -> Result<()> {
    const EVENT_TYPE: &str = "org.hyphae.test";

    let node = Node::start("node", &[]).await?;
    let alice = register(&node, "alice").await?;
    let bob = register(&node, "bob").await?;
    let alice_id = alice.user_id().context("alice is logged in")?.to_owned();
    let bob_id = bob.user_id().context("bob is logged in")?.to_owned();
    let bob_device = bob.device_id().context("bob has a device")?.to_owned();

    let room = create_room(&alice, "typing", std::slice::from_ref(&bob_id)).await?;
    let bob_room = bob.join_room_by_id(room.room_id()).await?;

    let (to_device_tx, mut to_device) = mpsc::unbounded_channel();
    bob.add_event_handler(move |event: Raw<AnyToDeviceEvent>| {
        let to_device_tx = to_device_tx.clone();
        async move {
            let _ = to_device_tx.send(event);
        }
    });
    // Subscribed before anything is typed, so that no notice can slip past.
    let (_typing_guard, mut typing) = bob_room.subscribe_to_typing_notifications();

    // Sliding sync is all bob runs: to-device messages arrive on the "encryption" connection,
    // typing notices on the room list's.
    let bob_sync = Syncing::sync_service(&bob).await?;

    let nonce = format!("{:?}", std::time::SystemTime::now());
    let content = Raw::new(&json!({ "nonce": nonce }))?.cast_unchecked();
    let messages = BTreeMap::from([(
        bob_id.clone(),
        BTreeMap::from([(DeviceIdOrAllDevices::DeviceId(bob_device), content)]),
    )]);
    alice
        .send(send_event_to_device::v3::Request::new_raw(
            EVENT_TYPE.into(),
            TransactionId::new(),
            messages,
        ))
        .await?;
    bob_sync
        .within("alice's to-device message", LOCAL, async {
            loop {
                let event = to_device.recv().await.context("the handler went away")?;
                if event.get_field::<String>("type")?.as_deref() != Some(EVENT_TYPE) {
                    continue;
                }
                let sender = event.get_field::<String>("sender")?;
                ensure!(
                    sender.as_deref() == Some(alice_id.as_str()),
                    "the to-device event's sender is {sender:?}"
                );
                let content = event.get_field::<serde_json::Value>("content")?;
                ensure!(
                    content == Some(json!({ "nonce": nonce })),
                    "the to-device event's content is {content:?}"
                );
                return Ok(());
            }
        })
        .await?;

    room.typing_notice(true).await?;
    bob_sync
        .within("alice typing", LOCAL, async {
            loop {
                match typing.recv().await {
                    Ok(users) if users.contains(&alice_id) => return Ok(()),
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => bail!("the typing notifications ended"),
                }
            }
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes() -> Result<()> {
    let node_a = Node::start("nodeA", &[]).await?;
    let node_b = Node::start("nodeB", &[node_a.dial_addr()]).await?;
    let alice = register(&node_a, "alice").await?;
    let bob = register(&node_b, "bob").await?;
    let alice_id = alice.user_id().context("alice is logged in")?.to_owned();
    let bob_id = bob.user_id().context("bob is logged in")?.to_owned();
    ensure!(
        bob_id.server_name().as_str() == node_b.server_name,
        "bob is a user of node B: {bob_id}"
    );

    // bob starts syncing first: the invite reaches him once node B has it from node A, which
    // needs the nodes to have found each other.
    let bob_sync = Syncing::room_list(&bob).await?;
    let list = bob_sync.room_list_service().all_rooms().await?;
    let (mut rooms, _controller) = watch_rooms(&list);

    let room = create_room(&alice, "across the peers", std::slice::from_ref(&bob_id)).await?;
    let room_id: &RoomId = room.room_id();
    rooms
        .until(&bob_sync, "the invite from node A", REMOTE, |items| {
            items
                .iter()
                .any(|r| r.room_id() == room_id && r.state() == RoomState::Invited)
                .then_some(())
        })
        .await?;
    let via = [alice_id.server_name().to_owned()];
    let bob_room = bob.join_room_by_id_or_alias(room_id.into(), &via).await?;
    bob_sync
        .room_list_service()
        .subscribe_to_rooms(&[room_id])
        .await;
    let timeline = bob_room.timeline().await?;
    let mut items = watch_timeline(&timeline).await;

    room.send(RoomMessageEventContent::text_plain("hello from node A"))
        .await?;
    items
        .until(&bob_sync, "alice's message from node A", REMOTE, |items| {
            has_message(items, alice_id.as_str(), "hello from node A").then_some(())
        })
        .await?;
    rooms
        .until(&bob_sync, "the joined room in his list", REMOTE, |items| {
            items
                .iter()
                .any(|r| {
                    r.room_id() == room_id
                        && r.state() == RoomState::Joined
                        && r.name().as_deref() == Some("across the peers")
                })
                .then_some(())
        })
        .await?;
    Ok(())
}
