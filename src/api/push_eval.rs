//! The push-rule evaluator the tab uses: the spec's rules over ruma's rule and condition
//! types, without ruma's evaluator. ruma matches keyword patterns with the `regex` crate, and
//! linking it put the tab's module 200 KB (gzipped) over its size budget; the glob patterns of
//! push rules need no more than a small automaton. Natively Hyphae uses ruma's evaluator; a
//! test checks that both judge the same events alike.

use ruma::push::{
    Action, AnyPushRuleRef, FlattenedJson, FlattenedJsonValue, PushCondition, PushConditionRoomCtx,
    Ruleset, ScalarJsonValue,
};

/// Rule ids whose old-style mention matching steps aside for `m.mentions`.
const ROOM_NOTIF: &str = ".m.rule.roomnotif";
const CONTAINS_DISPLAY_NAME: &str = ".m.rule.contains_display_name";
const CONTAINS_USER_NAME: &str = ".m.rule.contains_user_name";

/// The actions of the first rule that applies to `event` (none for the user's own events).
pub(super) fn actions<'r>(
    rules: &'r Ruleset,
    event: &FlattenedJson,
    ctx: &PushConditionRoomCtx,
) -> &'r [Action] {
    let sender = event.get_str("sender");
    if sender == Some(ctx.user_id.as_str()) {
        return &[];
    }
    for rule in rules {
        if rule.enabled() && applies(rule, event, ctx) {
            return rule.actions();
        }
    }
    &[]
}

fn applies(rule: AnyPushRuleRef<'_>, event: &FlattenedJson, ctx: &PushConditionRoomCtx) -> bool {
    use AnyPushRuleRef as R;
    match rule {
        R::Override(r) | R::Underride(r) => {
            if (r.rule_id == ROOM_NOTIF || r.rule_id == CONTAINS_DISPLAY_NAME)
                && event.contains_mentions()
            {
                return false;
            }
            r.conditions.iter().all(|c| condition(c, event, ctx))
        }
        R::Content(r) => {
            if r.rule_id == CONTAINS_USER_NAME && event.contains_mentions() {
                return false;
            }
            event
                .get_str("content.body")
                .is_some_and(|body| matches_word(body, &r.pattern))
        }
        R::Room(r) => r.rule_id == ctx.room_id,
        R::Sender(r) => event.get_str("sender") == Some(r.rule_id.as_str()),
        _ => false,
    }
}

fn condition(c: &PushCondition, event: &FlattenedJson, ctx: &PushConditionRoomCtx) -> bool {
    match c {
        PushCondition::EventMatch(m) => match event.get_str(&m.key) {
            Some(value) if m.key == "content.body" => matches_word(value, &m.pattern),
            Some(value) => glob_full(&value.to_lowercase(), &m.pattern.to_lowercase()),
            None => false,
        },
        #[allow(deprecated)]
        PushCondition::ContainsDisplayName => {
            !ctx.user_display_name.is_empty()
                && event
                    .get_str("content.body")
                    .is_some_and(|body| matches_word(body, &glob_escape(&ctx.user_display_name)))
        }
        PushCondition::RoomMemberCount(m) => {
            std::ops::RangeBounds::contains(&m.is, &ctx.member_count)
        }
        PushCondition::SenderNotificationPermission(p) => {
            match (&ctx.power_levels, event.get_str("sender")) {
                (Some(levels), Some(sender)) => ruma::UserId::parse(sender)
                    .is_ok_and(|s| levels.has_sender_notification_permission(&s, &p.key)),
                _ => false,
            }
        }
        PushCondition::EventPropertyIs(p) => {
            event.get(&p.key).is_some_and(|v| scalar_eq(&p.value, v))
        }
        PushCondition::EventPropertyContains(p) => match event.get(&p.key) {
            Some(FlattenedJsonValue::Array(items)) => items.iter().any(|i| i == &p.value),
            _ => false,
        },
        _ => false,
    }
}

fn scalar_eq(want: &ScalarJsonValue, have: &FlattenedJsonValue) -> bool {
    match (want, have) {
        (ScalarJsonValue::Null, FlattenedJsonValue::Null) => true,
        (ScalarJsonValue::Bool(a), FlattenedJsonValue::Bool(b)) => a == b,
        (ScalarJsonValue::Integer(a), FlattenedJsonValue::Integer(b)) => a == b,
        (ScalarJsonValue::String(a), FlattenedJsonValue::String(b)) => a == b,
        _ => false,
    }
}

/// `text` with the glob characters of a literal (a display name) escaped away: the matcher
/// below treats `*` and `?` as wildcards, so a literal is matched by replacing them with `?`
/// (any one character, which includes the character itself).
fn glob_escape(text: &str) -> String {
    text.chars()
        .map(|c| if c == '*' { '?' } else { c })
        .collect()
}

/// The spec's word characters (ASCII letters, digits, `_`).
fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `pattern` (a glob: `*` any run, `?` one character) matches a word-bounded run of
/// `text`, case-insensitively: it starts and ends where a word does not go on either side.
fn matches_word(text: &str, pattern: &str) -> bool {
    let text: Vec<char> = text.to_lowercase().chars().collect();
    let pattern: Vec<char> = pattern.to_lowercase().chars().collect();
    if pattern.is_empty() {
        return false;
    }
    let boundary =
        |k: usize| k == 0 || k == text.len() || !(is_word(text[k - 1]) && is_word(text[k]));
    // One pass of a glob automaton over the text, started afresh at every boundary: the
    // states are how much of the pattern has been matched.
    let m = pattern.len();
    let mut active = vec![false; m + 1];
    let close = |active: &mut Vec<bool>| {
        // A `*` may match nothing: whoever reached it also stands past it.
        for i in 0..m {
            if active[i] && pattern[i] == '*' {
                active[i + 1] = true;
            }
        }
    };
    for j in 0..=text.len() {
        if boundary(j) {
            active[0] = true;
        }
        close(&mut active);
        if active[m] && boundary(j) {
            return true;
        }
        if j == text.len() {
            break;
        }
        let c = text[j];
        let mut next = vec![false; m + 1];
        for i in 0..m {
            if !active[i] {
                continue;
            }
            match pattern[i] {
                '*' => next[i] = true,
                '?' => next[i + 1] = true,
                p if p == c => next[i + 1] = true,
                _ => {}
            }
        }
        active = next;
    }
    false
}

/// Whether the glob `pattern` matches the whole of `text`.
fn glob_full(text: &str, pattern: &str) -> bool {
    let (t, p): (Vec<char>, Vec<char>) = (text.chars().collect(), pattern.chars().collect());
    let (mut ti, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use ruma::push::{NewPatternedPushRule, NewPushRule, NewSimplePushRule};
    use ruma::serde::Raw;
    use serde_json::{json, Value};

    fn ctx() -> PushConditionRoomCtx {
        PushConditionRoomCtx::new(
            ruma::owned_room_id!("!room:example.org"),
            js_int::uint!(3),
            ruma::owned_user_id!("@alice:example.org"),
            "Alice Liddell".into(),
        )
    }

    fn event(sender: &str, content: Value) -> Raw<Value> {
        let v = json!({"type": "m.room.message", "sender": sender, "room_id": "!room:example.org",
            "event_id": "$e", "origin_server_ts": 1, "content": content});
        Raw::from_json(serde_json::value::to_raw_value(&v).unwrap())
    }

    #[test]
    fn globs() {
        assert!(matches_word("hello world", "world"));
        assert!(matches_word("hello, World!", "world"));
        assert!(!matches_word("helloworld", "world"));
        assert!(matches_word("the cake is a lie", "ca*"));
        assert!(matches_word("the cake is a lie", "c?ke"));
        assert!(!matches_word("the cake is a lie", "c?k"));
        assert!(matches_word("ping @room now", "@room"));
        assert!(glob_full("m.room.message", "m.room.*"));
        assert!(!glob_full("m.room.message", "m.room"));
        assert!(glob_full("abc", "a?c"));
    }

    /// Both evaluators judge the same events alike under the default rules and user rules.
    #[tokio::test]
    async fn agrees_with_rumas_evaluator() {
        let user = ruma::owned_user_id!("@alice:example.org");
        let mut rules = Ruleset::server_default(&user);
        rules
            .insert(
                NewPushRule::Content(NewPatternedPushRule::new(
                    "cakes".into(),
                    "cake*".into(),
                    vec![Action::Notify],
                )),
                None,
                None,
            )
            .unwrap();
        rules
            .insert(
                NewPushRule::Sender(NewSimplePushRule::new(
                    ruma::owned_user_id!("@spam:example.org"),
                    vec![],
                )),
                None,
                None,
            )
            .unwrap();
        let ctx = ctx();
        let cases = [
            event(
                "@bob:example.org",
                json!({"msgtype": "m.text", "body": "hello"}),
            ),
            event(
                "@bob:example.org",
                json!({"msgtype": "m.text", "body": "hi alice"}),
            ),
            event(
                "@bob:example.org",
                json!({"msgtype": "m.text", "body": "Alice Liddell, look"}),
            ),
            event(
                "@bob:example.org",
                json!({"msgtype": "m.text", "body": "cakes!", }),
            ),
            event(
                "@bob:example.org",
                json!({"msgtype": "m.text", "body": "x",
                "m.mentions": {"user_ids": ["@alice:example.org"]}}),
            ),
            event(
                "@bob:example.org",
                json!({"msgtype": "m.text", "body": "hi alice",
                "m.mentions": {}}),
            ),
            event(
                "@spam:example.org",
                json!({"msgtype": "m.text", "body": "alice"}),
            ),
            event(
                "@alice:example.org",
                json!({"msgtype": "m.text", "body": "alice"}),
            ),
            event(
                "@bob:example.org",
                json!({"msgtype": "m.notice", "body": "alice"}),
            ),
        ];
        for raw in &cases {
            let flat = FlattenedJson::from_raw(raw);
            let ours = actions(&rules, &flat, &ctx);
            let theirs = rules.get_actions(raw, &ctx).await;
            assert_eq!(
                format!("{ours:?}"),
                format!("{theirs:?}"),
                "{}",
                raw.json().get()
            );
        }
    }
}
