//! Other people: the profiles of users on other peers, and the user directory.
//!
//! Both come from the member events of rooms the caller shares with those users. A member
//! event carries the user's display name and avatar as of their last change (their server
//! sends new member events to every room they are in), so no request to their server is
//! needed — and a server that shares no room with the user would be refused one anyway (the
//! room service tells nothing of a user to a server that shares no room with them).

use std::collections::HashMap;

use ruma::{OwnedUserId, UserId};
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::events::membership_of;
use super::{body_object, ok, ApiResponse, ClientApi};

/// Most users one directory search returns, whatever the client asks.
const MAX_SEARCH_RESULTS: usize = 50;

/// A user as a member event of a shared room shows them.
struct Seen {
    displayname: Option<String>,
    avatar_url: Option<String>,
    /// Stream position of that member event: the newest wins.
    pos: u64,
}

impl ClientApi {
    /// Every user (joined) in a room where `s`'s user is joined, with their newest profile.
    async fn people_sharing_rooms(&self, s: &Session) -> ApiResult<HashMap<OwnedUserId, Seen>> {
        let engine = self.node.engine();
        let mut people: HashMap<OwnedUserId, Seen> = HashMap::new();
        for room in engine.rooms().await? {
            let Some(state) = engine.current_state(&room).await? else {
                continue;
            };
            if self.membership(&state, &s.user_id).await?.as_deref() != Some("join") {
                continue;
            }
            for ((kind, key), id) in &state {
                if kind != "m.room.member" {
                    continue;
                }
                let (Ok(user), Some(ev)) =
                    (OwnedUserId::try_from(key.as_str()), engine.event(id).await?)
                else {
                    continue;
                };
                if membership_of(&ev).as_deref() != Some("join") {
                    continue;
                }
                let pos = ev.stream.unwrap_or(0);
                if people.get(&user).is_some_and(|seen| seen.pos >= pos) {
                    continue;
                }
                let content: Value = serde_json::from_str(ev.pdu.content.get()).unwrap_or_default();
                let text = |field: &str| content[field].as_str().map(str::to_owned);
                people.insert(
                    user,
                    Seen {
                        displayname: text("displayname"),
                        avatar_url: text("avatar_url"),
                        pos,
                    },
                );
            }
        }
        Ok(people)
    }

    /// The profile of a user on another peer, as the rooms shared with them show it.
    pub(super) async fn remote_profile(
        &self,
        s: &Session,
        user: &UserId,
    ) -> ApiResult<serde_json::Map<String, Value>> {
        let people = self.people_sharing_rooms(s).await?;
        let seen = people
            .get(user)
            .ok_or_else(|| ApiError::not_found("no room you are in has this user"))?;
        let mut profile = serde_json::Map::new();
        if let Some(d) = &seen.displayname {
            profile.insert("displayname".into(), d.clone().into());
        }
        if let Some(a) = &seen.avatar_url {
            profile.insert("avatar_url".into(), a.clone().into());
        }
        Ok(profile)
    }

    /// `POST /user_directory/search`: users who share a room with the caller whose id or
    /// display name contains every word of `search_term`.
    pub(super) async fn search_users(
        &self,
        req: &super::ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let term = body
            .get("search_term")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_json("search_term is required"))?
            .to_lowercase();
        let limit = body
            .get("limit")
            .and_then(Value::as_u64)
            .map_or(10, |l| l as usize)
            .clamp(1, MAX_SEARCH_RESULTS);
        let words: Vec<&str> = term.split_whitespace().collect();
        let mut found: Vec<(OwnedUserId, Seen)> = self
            .people_sharing_rooms(s)
            .await?
            .into_iter()
            .filter(|(user, seen)| {
                let haystack = format!(
                    "{} {}",
                    user.as_str().to_lowercase(),
                    seen.displayname.as_deref().unwrap_or("").to_lowercase()
                );
                !words.is_empty() && words.iter().all(|w| haystack.contains(w))
            })
            .collect();
        // Names first, in order; then ids.
        found.sort_by(|(a, sa), (b, sb)| {
            (sa.displayname.as_deref(), a.as_str()).cmp(&(sb.displayname.as_deref(), b.as_str()))
        });
        let limited = found.len() > limit;
        let results: Vec<Value> = found
            .into_iter()
            .take(limit)
            .map(|(user, seen)| {
                let mut r = json!({ "user_id": user });
                if let Some(d) = seen.displayname {
                    r["display_name"] = d.into();
                }
                if let Some(a) = seen.avatar_url {
                    r["avatar_url"] = a.into();
                }
                r
            })
            .collect();
        ok(json!({ "results": results, "limited": limited }))
    }
}
