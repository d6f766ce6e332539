//! Push rules: the user's rule set (kept as their `m.push_rules` account data, so every sync
//! carries changes), the `/pushrules` endpoints that change it, and the evaluation of every
//! event a user receives against it — what makes `notification_count` and `highlight_count`.

use std::collections::BTreeMap;

use js_int::{Int, UInt};
use ruma::push::{
    Action, NewPushRule, PushConditionPowerLevelsCtx, PushConditionRoomCtx, RuleKind, Ruleset,
};
use ruma::serde::Raw;
use ruma::{OwnedUserId, RoomId, UserId};
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::events::membership_of;
use super::{ok, parse, ApiRequest, ApiResponse, ClientApi};
use crate::engine::pdu::StoredEvent;
use crate::engine::SortedState;

/// The account-data type the rule set is kept under.
pub(super) const PUSH_RULES: &str = "m.push_rules";
/// Rules one user may have, the server's defaults included.
const MAX_RULES: usize = 500;

fn rule_kind(kind: &str) -> ApiResult<RuleKind> {
    Ok(match kind {
        "override" => RuleKind::Override,
        "underride" => RuleKind::Underride,
        "sender" => RuleKind::Sender,
        "room" => RuleKind::Room,
        "content" => RuleKind::Content,
        other => {
            return Err(ApiError::invalid_param(format!(
                "`{other}` is not a push rule kind"
            )))
        }
    })
}

/// A rule as the spec shows it (its kind is in the path).
fn rule_json(rule: ruma::push::AnyPushRuleRef<'_>) -> Value {
    use ruma::push::AnyPushRuleRef as R;
    let json = match rule {
        R::Override(r) | R::Underride(r) => serde_json::to_value(r),
        R::Content(r) => serde_json::to_value(r),
        R::Room(r) => serde_json::to_value(r),
        R::Sender(r) => serde_json::to_value(r),
        _ => Ok(Value::Null),
    };
    json.expect("rules serialise")
}

fn no_rule() -> ApiError {
    ApiError::not_found("no such push rule")
}

impl ClientApi {
    /// The user's push rules: as they set them, else the server's defaults.
    pub(super) async fn push_ruleset(&self, user: &UserId) -> ApiResult<Ruleset> {
        let stored = self.data.account_data(user, None, PUSH_RULES).await?;
        Ok(stored
            .and_then(|c| serde_json::from_value(c["global"].clone()).ok())
            .unwrap_or_else(|| Ruleset::server_default(user)))
    }

    async fn put_ruleset(&self, user: &UserId, rules: &Ruleset) -> ApiResult<()> {
        let content = json!({ "global": rules });
        self.data
            .put_account_data(user, None, PUSH_RULES, content)
            .await?;
        self.node.changed();
        Ok(())
    }

    /// Everything under `/pushrules/`.
    pub(super) async fn push_rules_route(
        &self,
        req: &ApiRequest,
        s: &Session,
        rest: &[&str],
    ) -> ApiResult<ApiResponse> {
        use http::Method as M;
        let rest: Vec<&str> = match rest.last() {
            // A trailing slash names the same thing.
            Some(&"") => rest[..rest.len() - 1].to_vec(),
            _ => rest.to_vec(),
        };
        let m = req.method().clone();
        // Read, change, write: one change to a user's rules at a time.
        let _one_at_a_time = match m {
            M::GET => None,
            _ => Some(self.txns.lock(format!("pushrules\0{}", s.user_id)).await),
        };
        match (&m, rest.as_slice()) {
            (&M::GET, []) => ok(json!({ "global": self.push_ruleset(&s.user_id).await? })),
            (&M::GET, ["global"]) => ok(serde_json::to_value(self.push_ruleset(&s.user_id).await?)
                .expect("rules serialise")),
            (&M::GET, ["global", kind, id]) => {
                let rules = self.push_ruleset(&s.user_id).await?;
                let rule = rules.get(rule_kind(kind)?, id).ok_or_else(no_rule)?;
                ok(rule_json(rule))
            }
            (&M::GET, ["global", kind, id, field @ ("enabled" | "actions")]) => {
                let rules = self.push_ruleset(&s.user_id).await?;
                let rule = rules.get(rule_kind(kind)?, id).ok_or_else(no_rule)?;
                ok(match *field {
                    "enabled" => json!({ "enabled": rule.enabled() }),
                    _ => json!({ "actions": rule.actions() }),
                })
            }
            (&M::PUT, ["global", kind, id]) => self.set_push_rule(req, s, kind, id).await,
            (&M::DELETE, ["global", kind, id]) => {
                let mut rules = self.push_ruleset(&s.user_id).await?;
                rules.remove(rule_kind(kind)?, id).map_err(|e| match e {
                    ruma::push::RemovePushRuleError::NotFound => no_rule(),
                    other => ApiError::invalid_param(other.to_string()),
                })?;
                self.put_ruleset(&s.user_id, &rules).await?;
                ok(json!({}))
            }
            (&M::PUT, ["global", kind, id, "enabled"]) => {
                use ruma::api::client::push::set_pushrule_enabled::v3::Request;
                rule_kind(kind)?;
                let r: Request = parse(req, &[kind, id])?;
                let mut rules = self.push_ruleset(&s.user_id).await?;
                rules
                    .set_enabled(r.kind, &r.rule_id, r.enabled)
                    .map_err(|_| no_rule())?;
                self.put_ruleset(&s.user_id, &rules).await?;
                ok(json!({}))
            }
            (&M::PUT, ["global", kind, id, "actions"]) => {
                use ruma::api::client::push::set_pushrule_actions::v3::Request;
                rule_kind(kind)?;
                let r: Request = parse(req, &[kind, id])?;
                let mut rules = self.push_ruleset(&s.user_id).await?;
                rules
                    .set_actions(r.kind, &r.rule_id, r.actions)
                    .map_err(|_| no_rule())?;
                self.put_ruleset(&s.user_id, &rules).await?;
                ok(json!({}))
            }
            (_, [] | ["global"] | ["global", _, _] | ["global", _, _, "enabled" | "actions"]) => {
                Err(ApiError::unrecognized(http::StatusCode::METHOD_NOT_ALLOWED))
            }
            _ => Err(ApiError::unrecognized(http::StatusCode::NOT_FOUND)),
        }
    }

    /// `PUT /pushrules/global/{kind}/{ruleId}` (`before`/`after` place it among its kind).
    async fn set_push_rule(
        &self,
        req: &ApiRequest,
        s: &Session,
        kind: &str,
        id: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::push::set_pushrule::v3::Request;
        rule_kind(kind)?;
        if id.is_empty() || id.len() > 255 {
            return Err(ApiError::invalid_param("rule ids are 1 to 255 bytes"));
        }
        let r: Request = parse(req, &[kind, id])?;
        if let NewPushRule::Room(rule) = &r.rule {
            RoomId::parse(&rule.rule_id)
                .map_err(|_| ApiError::invalid_param("a room rule's id is a room id"))?;
        }
        if let NewPushRule::Sender(rule) = &r.rule {
            UserId::parse(&rule.rule_id)
                .map_err(|_| ApiError::invalid_param("a sender rule's id is a user id"))?;
        }
        let mut rules = self.push_ruleset(&s.user_id).await?;
        rules
            .insert(r.rule, r.after.as_deref(), r.before.as_deref())
            .map_err(|e| match e {
                ruma::push::InsertPushRuleError::UnknownRuleId => {
                    ApiError::not_found("no rule with that `before`/`after` id")
                }
                other => ApiError::invalid_param(other.to_string()),
            })?;
        if rules.iter().count() > MAX_RULES {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "M_LIMIT_EXCEEDED",
                format!("at most {MAX_RULES} push rules"),
            ));
        }
        self.put_ruleset(&s.user_id, &rules).await?;
        ok(json!({}))
    }

    /// What the user's rules make of events in a room with `state`: built once per room and
    /// pass, then asked per event.
    pub(super) async fn notifier<'r>(
        &self,
        room: &RoomId,
        state: &SortedState,
        user: &UserId,
        rules: &'r Ruleset,
    ) -> ApiResult<Notifier<'r>> {
        let engine = self.node.engine();
        let (mut members, mut display_name) = (0u64, user.localpart().to_owned());
        let from = ("m.room.member".to_owned(), String::new());
        for ((kind, key), id) in state.range(from..) {
            if kind != "m.room.member" {
                break;
            }
            let Some(ev) = engine.event(id).await? else {
                continue;
            };
            if membership_of(&ev).as_deref() != Some("join") {
                continue;
            }
            members += 1;
            if key == user.as_str() {
                let content: Value =
                    serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null);
                if let Some(name) = content["displayname"].as_str() {
                    display_name = name.to_owned();
                }
            }
        }
        let mut ctx = PushConditionRoomCtx::new(
            room.to_owned(),
            UInt::new_saturating(members),
            user.to_owned(),
            display_name,
        );
        if let Some(levels) = self.power_levels_ctx(state).await? {
            ctx = ctx.with_power_levels(levels);
        }
        Ok(Notifier { rules, ctx })
    }

    /// The parts of the room's power levels push conditions look at (`@room` needs them).
    async fn power_levels_ctx(
        &self,
        state: &SortedState,
    ) -> ApiResult<Option<PushConditionPowerLevelsCtx>> {
        let engine = self.node.engine();
        let content_of = |kind: &str| state.get(&(kind.to_owned(), String::new())).cloned();
        let Some(create_id) = content_of("m.room.create") else {
            return Ok(None);
        };
        let Some(create) = engine.event(&create_id).await? else {
            return Ok(None);
        };
        let create_content: Value =
            serde_json::from_str(create.pdu.content.get()).unwrap_or(Value::Null);
        let version = create_content["room_version"]
            .as_str()
            .and_then(|v| ruma::RoomVersionId::try_from(v).ok())
            .unwrap_or(ruma::RoomVersionId::V1);
        let Some(version_rules) = version.rules() else {
            return Ok(None);
        };
        let mut creators = vec![create.pdu.sender.clone()];
        creators.extend(
            create_content["additional_creators"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str().and_then(|u| OwnedUserId::try_from(u).ok())),
        );
        let pl: Value = match content_of("m.room.power_levels") {
            Some(id) => match engine.event(&id).await? {
                Some(ev) => serde_json::from_str(ev.pdu.content.get()).unwrap_or(Value::Null),
                None => Value::Null,
            },
            None => Value::Null,
        };
        let level = |v: &Value| {
            v.as_i64()
                .or_else(|| v.as_str()?.trim().parse().ok())
                .and_then(Int::new)
        };
        let mut users: BTreeMap<OwnedUserId, Int> = BTreeMap::new();
        if let Some(map) = pl["users"].as_object() {
            for (u, l) in map {
                if let (Ok(u), Some(l)) = (OwnedUserId::try_from(u.as_str()), level(l)) {
                    users.insert(u, l);
                }
            }
        }
        if pl.is_null() {
            // No power levels yet: the creator has 100.
            users.insert(create.pdu.sender.clone(), Int::from(100));
        }
        let mut notifications = ruma::power_levels::NotificationPowerLevels::new();
        if let Some(room_level) = level(&pl["notifications"]["room"]) {
            notifications.room = room_level;
        }
        Ok(Some(PushConditionPowerLevelsCtx::new(
            users,
            level(&pl["users_default"]).unwrap_or_default(),
            notifications,
            ruma::room_version_rules::RoomPowerLevelsRules::new(
                &version_rules.authorization,
                creators,
            ),
        )))
    }
}

/// One user's push rules in one room.
pub(super) struct Notifier<'r> {
    rules: &'r Ruleset,
    ctx: PushConditionRoomCtx,
}

/// What the rules made of an event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Judgement {
    pub notify: bool,
    pub highlight: bool,
}

impl Notifier<'_> {
    pub async fn judge(&self, ev: &StoredEvent) -> Judgement {
        let mut json = json!({
            "type": ev.pdu.kind.to_string(),
            "sender": ev.pdu.sender,
            "room_id": ev.pdu.room_id,
            "event_id": ev.pdu.event_id,
            "origin_server_ts": ev.pdu.origin_server_ts,
            "content": serde_json::from_str::<Value>(ev.pdu.content.get()).unwrap_or(Value::Null),
        });
        if let Some(k) = &ev.pdu.state_key {
            json["state_key"] = k.as_str().into();
        }
        let Ok(raw) = serde_json::value::to_raw_value(&json) else {
            return Judgement::default();
        };
        let raw: Raw<Value> = Raw::from_json(raw);
        #[cfg(not(target_arch = "wasm32"))]
        let actions = self.rules.get_actions(&raw, &self.ctx).await;
        #[cfg(target_arch = "wasm32")]
        let actions = super::push_eval::actions(
            self.rules,
            &ruma::push::FlattenedJson::from_raw(&raw),
            &self.ctx,
        );
        Judgement {
            notify: actions.iter().any(Action::should_notify),
            highlight: actions.iter().any(Action::is_highlight),
        }
    }
}
