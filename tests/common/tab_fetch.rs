//! The client API through a tab's `fetch` export, as a [`Transport`] for the client scenario.

use hyphae::web::Hyphae;
use serde_json::Value;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

use super::client::Transport;

pub struct TabFetch(pub Hyphae);

impl Transport for TabFetch {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let init = js_sys::Object::new();
        let set = |k: &str, v: &JsValue| js_sys::Reflect::set(&init, &k.into(), v).unwrap();
        set("method", &method.into());
        let headers = js_sys::Object::new();
        js_sys::Reflect::set(&headers, &"Content-Type".into(), &"application/json".into()).unwrap();
        if let Some(t) = token {
            js_sys::Reflect::set(
                &headers,
                &"Authorization".into(),
                &format!("Bearer {t}").into(),
            )
            .unwrap();
        }
        set("headers", &headers);
        if let Some(b) = body {
            set("body", &b.to_string().into());
        }
        let url = format!("https://hyphae.invalid{path}");
        let resp = JsFuture::from(self.0.fetch(url.into(), init.into()))
            .await
            .unwrap();
        let resp: web_sys::Response = resp.dyn_into().unwrap();
        let text = JsFuture::from(resp.text().unwrap()).await.unwrap();
        let json = serde_json::from_str(&text.as_string().unwrap()).unwrap_or(Value::Null);
        (resp.status(), json)
    }
}
