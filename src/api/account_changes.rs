//! What a user changes about their account after registering: signing several devices out at
//! once, a new password, and deactivation. Each needs the password again (user-interactive
//! auth, `m.login.password`): an access token alone does not end other sessions or the account.

use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::events::membership_of;
use super::{body_object, ok, parse, ApiRequest, ApiResponse, ClientApi, UiaPurpose};

/// Devices one `/delete_devices` may name.
const MAX_DEVICES_PER_REQUEST: usize = 1000;

impl ClientApi {
    /// `POST /delete_devices`: ends the sessions of the named devices (those that do not exist
    /// are passed over, as the spec has it).
    pub(super) async fn delete_devices(
        &self,
        req: &ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::device::delete_devices::v3::Request;
        let r: Request = parse(req, &[])?;
        if r.devices.len() > MAX_DEVICES_PER_REQUEST {
            return Err(ApiError::invalid_param(format!(
                "at most {MAX_DEVICES_PER_REQUEST} devices per request"
            )));
        }
        let mut named: Vec<String> = r.devices.iter().map(|d| d.to_string()).collect();
        named.sort();
        named.dedup();
        let purpose = UiaPurpose::DeleteDevices {
            user: s.user_id.clone(),
            devices: named.clone(),
        };
        if let Some(challenge) = self.password_uia(r.auth, s, purpose).await? {
            return Ok(challenge);
        }
        let gone: Vec<_> = self
            .accounts
            .devices(&s.user_id)
            .await?
            .into_iter()
            .filter(|d| named.binary_search(&d.device_id.to_string()).is_ok())
            .collect();
        self.accounts.remove_devices(&s.user_id, &gone).await?;
        let ids: Vec<String> = gone.iter().map(|d| d.device_id.to_string()).collect();
        self.devices_removed(&s.user_id, &ids).await?;
        ok(json!({}))
    }

    /// `POST /account/password`: a new password; other devices are signed out unless the
    /// client asks to keep them (`logout_devices: false`).
    pub(super) async fn change_password(
        &self,
        req: &ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::account::change_password::v3::Request;
        let r: Request = parse(req, &[])?;
        // One change to an account at a time: a new password cannot reopen a closing account.
        let _one_at_a_time = self.txns.lock(format!("account\0{}", s.user_id)).await;
        let purpose = UiaPurpose::ChangePassword {
            user: s.user_id.clone(),
        };
        if let Some(challenge) = self.password_uia(r.auth, s, purpose).await? {
            return Ok(challenge);
        }
        if r.new_password.is_empty() {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "M_WEAK_PASSWORD",
                "the new password is empty",
            ));
        }
        self.accounts
            .set_password(&s.user_id, &r.new_password)
            .await?;
        if r.logout_devices {
            let others: Vec<_> = self
                .accounts
                .devices(&s.user_id)
                .await?
                .into_iter()
                .filter(|d| d.device_id != s.device_id)
                .collect();
            self.accounts.remove_devices(&s.user_id, &others).await?;
            let ids: Vec<String> = others.iter().map(|d| d.device_id.to_string()).collect();
            self.devices_removed(&s.user_id, &ids).await?;
        }
        ok(json!({}))
    }

    /// `POST /account/deactivate`: the account leaves every room and declines every invite,
    /// loses its devices and keys, and can never log in again; its name stays taken.
    pub(super) async fn deactivate(&self, req: &ApiRequest, s: &Session) -> ApiResult<ApiResponse> {
        use ruma::api::client::account::deactivate::v3::Request;
        let erase = body_object(req)?
            .get("erase")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let r: Request = parse(req, &[])?;
        let _one_at_a_time = self.txns.lock(format!("account\0{}", s.user_id)).await;
        let purpose = UiaPurpose::Deactivate {
            user: s.user_id.clone(),
        };
        if let Some(challenge) = self.password_uia(r.auth, s, purpose).await? {
            return Ok(challenge);
        }
        // The account is closed last: should a step fail, the password still works and a
        // retry finishes the rest.
        let engine = self.node.engine();
        for room in engine.rooms().await? {
            let Some(state) = engine.current_state(&room).await? else {
                continue;
            };
            let Some(member) = self.member_event(&state, &s.user_id).await? else {
                continue;
            };
            if matches!(
                membership_of(&member).as_deref(),
                Some("join" | "invite" | "knock")
            ) {
                self.send_as(
                    s,
                    &room,
                    "m.room.member",
                    Some(s.user_id.as_str()),
                    json!({"membership": "leave"}),
                )
                .await?;
            }
        }
        for inv in self.node.invites() {
            if inv.invitee == s.user_id {
                self.node.decline_invite(&inv.room_id, &s.user_id).await?;
            }
        }
        let devices = self.accounts.devices(&s.user_id).await?;
        self.accounts.remove_devices(&s.user_id, &devices).await?;
        let ids: Vec<String> = devices.iter().map(|d| d.device_id.to_string()).collect();
        self.devices_removed(&s.user_id, &ids).await?;
        self.data.delete_cross_signing_keys(&s.user_id).await?;
        self.accounts.deactivate(&s.user_id, erase).await?;
        ok(json!({"id_server_unbind_result": "no-support"}))
    }
}
