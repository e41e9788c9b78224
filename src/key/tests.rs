use super::*;

#[test]
fn escapes_round_trip() {
    let key = IdempotencyKey::new("a:b%c", "%3A", ":").params(b"x");
    let text = key.to_string();
    assert_eq!(text.matches(':').count(), 3, "{text}");
    assert_eq!(IdempotencyKey::parse(&text), Ok(key));
}

#[test]
fn the_layers_text_is_the_display_text() {
    for key in [
        IdempotencyKey::new("a:b%c", "%3A", ":").params(b"x"),
        IdempotencyKey::new("8e03978e", "POST /orders", ""),
        IdempotencyKey::new("", "", "%%::"),
    ] {
        assert_eq!(key.to_text(), key.to_string());
    }
}

#[test]
fn the_storage_key_is_the_keys_text() {
    for (signal, action, target, params_in_key) in [
        ("8e03978e", "POST /orders", "", false),
        ("8e03978e", "POST /a:b%c", "0123456789abcdef", false),
        ("k", "create_task", "trello:board", true),
        ("needs:escape%", "act", "t", true),
        ("", "", "", false),
    ] {
        let parts = KeyParts {
            signal: signal.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            params_in_key,
        };
        let body = b"{\"title\":\"Ship it\"}";
        let expected = parts.clone().into_key(body).to_text();
        let rest = storage_key_rest_len(action, target, params_in_key);
        let text = parts.into_storage_key(body);
        assert_eq!(text, expected);
        if !signal.contains([':', '%']) {
            assert_eq!(text.len(), signal.len() + rest, "{text}");
        }
    }
}

#[test]
fn rejects_bad_forms() {
    assert_eq!(IdempotencyKey::parse("a:b"), Err(KeyParseError::Components));
    assert_eq!(
        IdempotencyKey::parse("a:b:c:d:e"),
        Err(KeyParseError::Components)
    );
    assert_eq!(IdempotencyKey::parse("a%:b:c"), Err(KeyParseError::Escape));
    assert_eq!(
        IdempotencyKey::parse("a:b:c:XYZ"),
        Err(KeyParseError::ParamsHash)
    );
}
