//! Loading: files, directories, multi-document YAML, all-or-nothing errors with locations.

use warden_authz::{Options, load_paths, load_paths_with, parse_str, parse_str_with_warnings};

#[test]
fn error_names_file_document_resource_field_and_reason() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: fintech-core}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-orders, namespace: fintech-core}
spec:
  rules:
  - from:
    - source:
        ipBlocks: ["10.0.0.0/8", "10.0.0.0/33"]
"#;
    let e = parse_str(yaml, "policies/x.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"policies/x.yaml: document 2 (fintech-core/allow-orders): spec.rules[0].from[0].source.ipBlocks[1]: "10.0.0.0/33" is not a CIDR"#
    );
}

#[test]
fn every_error_is_listed_and_unknown_fields_are_rejected() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: ns}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ["99999"]}}]
    when: [{key: request.url_path, values: ["/x"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b, namespace: ns}
spec:
  rules:
  - from: [{source: {notPrincipal: ["x"]}}]
"#;
    let e = parse_str(yaml, "f.yaml").unwrap_err();
    let lines: Vec<String> = e.iter().map(|e| e.to_string()).collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert_eq!(
        lines[0],
        r#"f.yaml: document 1 (ns/a): spec.rules[0].to[0].operation.ports[0]: "99999" is not a port number in range 1..65535"#
    );
    assert_eq!(
        lines[1],
        r#"f.yaml: document 1 (ns/a): spec.rules[0].when[0].key: unknown attribute "request.url_path""#
    );
    assert!(
        lines[2].starts_with(
            "f.yaml: document 2 (ns/b): spec.rules[0].from[0].source.notPrincipal: unknown field `notPrincipal`"
        ),
        "{}",
        lines[2]
    );
}

#[test]
fn directories_are_read_recursively_and_all_or_nothing() {
    let dir = std::env::temp_dir().join(format!("warden-authz-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: ns}\nspec: {}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("sub/b.yml"),
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: b, namespace: ns}\nspec: {jwtRules: [{issuer: x, jwksUri: \"https://x/jwks\"}]}\n",
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
    let set = load_paths(&[&dir]).unwrap();
    assert_eq!(set.authorization_policies().len(), 1);
    assert_eq!(set.request_authentications().len(), 1);
    // A duplicate makes the whole load fail.
    std::fs::write(dir.join("sub/c.yaml"), std::fs::read_to_string(dir.join("a.yaml")).unwrap()).unwrap();
    let e = load_paths(&[&dir]).unwrap_err();
    assert!(e.to_string().contains("duplicate AuthorizationPolicy ns/a"), "{e}");
    let e = load_paths(&[dir.join("missing.yaml")]).unwrap_err();
    assert!(e.to_string().contains("missing.yaml: cannot read"), "{e}");
    let set =
        load_paths_with(&[dir.join("a.yaml")], &Options { root_namespace: "mesh-root".into(), ..Options::default() })
            .unwrap();
    assert_eq!(set.root_namespace(), "mesh-root");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn yaml_syntax_errors_and_wrong_kinds() {
    let e = parse_str("kind: [", "bad.yaml").unwrap_err();
    assert!(e.to_string().starts_with("bad.yaml: document 1: invalid YAML"), "{e}");
    let e = parse_str("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", "cm.yaml").unwrap_err();
    assert!(e.to_string().contains("kind: \"ConfigMap\" is not supported"), "{e}");
    let e = parse_str(
        "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: y}\n",
        "v.yaml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("apiVersion: \"security.istio.io/v2\" is not supported"), "{e}");
}

#[test]
fn warnings_for_extensions_and_l7_at_l4() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: ns}
spec:
  rules:
  - to: [{operation: {methods: ["GET"]}}]
    when:
    - {key: custom.time_of_day, values: ["08:00-18:00"]}
    - {key: "request.headers[amount]", notValues: [">100"]}
"#;
    let p = parse_str_with_warnings(yaml, "w.yaml").unwrap();
    let all = p.warnings.join("\n");
    assert!(all.contains("custom.time_of_day is a warden extension, not portable to Istio"), "{all}");
    assert!(all.contains("numeric header comparison is a warden extension"), "{all}");
    assert!(all.contains("ALLOW rule uses L7 (HTTP) attributes"), "{all}");
}
