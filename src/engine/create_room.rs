//! The initial events of a new room, the way Synapse's `createRoom` presets make them.

use ruma::{OwnedUserId, RoomVersionId, UserId};
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    #[default]
    PrivateChat,
    PublicChat,
    TrustedPrivateChat,
}

/// What the creator asked for (the engine-level part of `/createRoom`).
#[derive(Debug, Clone, Default)]
pub struct CreateRoom {
    pub preset: Preset,
    pub room_version: Option<RoomVersionId>,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    /// Extra `m.room.create` content (e.g. `type`).
    pub creation_content: Map<String, Value>,
    /// `(type, state_key, content)` events sent after the preset's own state.
    pub initial_state: Vec<(String, String, Value)>,
    /// Merged over the preset's power levels (top-level keys replace).
    pub power_level_content_override: Option<Map<String, Value>>,
    /// Merged into the creator's join event (`displayname`, `avatar_url`).
    pub creator_profile: Map<String, Value>,
}

/// The room version new rooms get unless asked otherwise.
pub const DEFAULT_ROOM_VERSION: RoomVersionId = RoomVersionId::V12;

/// `(type, state_key, content)` in the order they are sent; the first is `m.room.create`.
pub fn initial_events(
    creator: &UserId,
    opts: &CreateRoom,
    version: &RoomVersionId,
) -> Vec<(String, String, Value)> {
    let v12 = matches!(version, RoomVersionId::V12);
    let trusted = opts.preset == Preset::TrustedPrivateChat;
    let mut events = Vec::new();

    let mut create = opts.creation_content.clone();
    create.insert("room_version".into(), json!(version.as_str()));
    if !v12 && !matches!(version, RoomVersionId::V11) {
        create.insert("creator".into(), json!(creator));
    }
    if v12 && trusted && !opts.invite.is_empty() {
        create.insert("additional_creators".into(), json!(opts.invite));
    }
    events.push(("m.room.create".into(), String::new(), Value::Object(create)));

    let mut join = Value::Object(opts.creator_profile.clone());
    join["membership"] = json!("join");
    if opts.is_direct {
        join["is_direct"] = json!(true);
    }
    events.push(("m.room.member".into(), creator.to_string(), join));

    // Room-version-12 creators have unlimited power and must not appear in `users`.
    let mut users = Map::new();
    if !v12 {
        users.insert(creator.to_string(), json!(100));
    }
    if trusted && !v12 {
        for u in &opts.invite {
            users.insert(u.to_string(), json!(100));
        }
    }
    let invite_level = if opts.preset == Preset::PublicChat {
        50
    } else {
        0
    };
    let mut power_levels = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": invite_level,
        "historical": 100
    });
    if let Some(overrides) = &opts.power_level_content_override {
        let pl = power_levels.as_object_mut().expect("object");
        for (k, v) in overrides {
            pl.insert(k.clone(), v.clone());
        }
    }
    events.push(("m.room.power_levels".into(), String::new(), power_levels));

    let join_rule = if opts.preset == Preset::PublicChat {
        "public"
    } else {
        "invite"
    };
    events.push((
        "m.room.join_rules".into(),
        String::new(),
        json!({ "join_rule": join_rule }),
    ));
    events.push((
        "m.room.history_visibility".into(),
        String::new(),
        json!({ "history_visibility": "shared" }),
    ));
    if opts.preset != Preset::PublicChat {
        events.push((
            "m.room.guest_access".into(),
            String::new(),
            json!({ "guest_access": "can_join" }),
        ));
    }
    events.extend(opts.initial_state.iter().cloned());
    if let Some(name) = &opts.name {
        events.push(("m.room.name".into(), String::new(), json!({ "name": name })));
    }
    if let Some(topic) = &opts.topic {
        events.push((
            "m.room.topic".into(),
            String::new(),
            json!({ "topic": topic }),
        ));
    }
    for invitee in &opts.invite {
        let mut content = json!({ "membership": "invite" });
        if opts.is_direct {
            content["is_direct"] = json!(true);
        }
        events.push(("m.room.member".into(), invitee.to_string(), content));
    }
    events
}
