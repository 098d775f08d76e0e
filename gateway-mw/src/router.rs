//! Route templates compiled into a segment trie, shared by authorization
//! (which permission a route needs) and validation (which limits a route
//! has).
//!
//! Templates are `/`-separated: literal segments, `{name}` for exactly one
//! segment, and a final `*name` for the rest of the path (one or more
//! segments). A literal beats `{param}`, which beats `*rest`; a method of `*`
//! matches any method not listed explicitly. Matching walks the path's
//! segments, so its cost depends on the path depth, never on the number of
//! routes.
//!
//! ## Path spelling
//!
//! One resource has many spellings (`/admin`, `/%61dmin`, `/ad%6Din`), and
//! the upstream decodes them all to the same thing. Routing on the raw
//! spelling would let a client pick the rule it is judged by, so:
//!
//! * [`normalize_path`] rewrites a request path into its RFC 3986 §6.2.2
//!   normal form (percent-encoded unreserved characters decoded, remaining
//!   escapes upper-cased) and refuses what has no safe normal form: dot
//!   segments, empty segments, encoded `/`, `\` or NUL, malformed escapes,
//!   and (unless allowed) `;` path parameters. The layers in `http` route and
//!   forward that normal form.
//! * [`Router::find`] compares literal segments after decoding them once,
//!   exactly as an upstream does, so a segment routes the same however its
//!   characters are escaped. `%2561dmin` decodes once to the literal
//!   `%61dmin`, which is not `admin`, and the upstream (decoding once too)
//!   sees the same literal.
//!
//! Matching is case-sensitive: `/Admin` is not `/admin`. Upstreams that route
//! case-insensitively need rules for every spelling, or a catch-all that
//! denies.

use std::borrow::Cow;
use std::collections::HashMap;

/// The most path segments a template or a matched path may have.
pub const MAX_SEGMENTS: usize = 32;

/// Why a route could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The template is invalid.
    #[error("route {template:?}: {reason}")]
    InvalidTemplate {
        /// The template.
        template: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The method and template are already routed.
    #[error("duplicate route {method} {template}")]
    Duplicate {
        /// The method.
        method: String,
        /// The template.
        template: String,
    },
}

/// A matched route: its value and template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a, T> {
    /// What was routed.
    pub value: &'a T,
    /// The template that matched (a low-cardinality label).
    pub template: &'a str,
}

type Methods<T> = HashMap<String, (T, String)>;

#[derive(Debug)]
struct Node<T> {
    literals: HashMap<String, Node<T>>,
    param: Option<Box<Node<T>>>,
    /// Routes ending in `*rest` here.
    rest: Methods<T>,
    /// Routes ending exactly here.
    methods: Methods<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literals: HashMap::new(),
            param: None,
            rest: HashMap::new(),
            methods: HashMap::new(),
        }
    }
}

/// Method + path template → `T`.
#[derive(Debug)]
pub struct Router<T> {
    root: Node<T>,
    len: usize,
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T> Router<T> {
    /// An empty router.
    pub fn new() -> Router<T> {
        Router::default()
    }

    /// Routes `method` (upper-cased; `*` for any) on `template` to `value`.
    pub fn insert(&mut self, method: &str, template: &str, value: T) -> Result<(), RouteError> {
        let invalid = |reason| RouteError::InvalidTemplate {
            template: template.to_owned(),
            reason,
        };
        let Some(rest) = template.strip_prefix('/') else {
            return Err(invalid("must start with /"));
        };
        let segments: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        if segments.len() > MAX_SEGMENTS {
            return Err(invalid("too many segments"));
        }
        let mut node = &mut self.root;
        for (i, segment) in segments.iter().enumerate() {
            if segment.is_empty() {
                return Err(invalid("empty segment"));
            }
            if let Some(name) = segment.strip_prefix('*') {
                if i + 1 != segments.len() || name.is_empty() {
                    return Err(invalid("*rest must be a named, final segment"));
                }
                insert_method(&mut node.rest, method, template, value)?;
                self.len += 1;
                return Ok(());
            }
            if segment.contains('%') {
                // Literals are compared with decoded request segments, so an
                // escape in a template could never match.
                return Err(invalid("write literal segments decoded, without %"));
            }
            node = if segment.starts_with('{') {
                if !segment.ends_with('}') || segment.len() < 3 {
                    return Err(invalid("a parameter is written {name}"));
                }
                node.param.get_or_insert_with(Box::default)
            } else {
                if segment.contains(['{', '}', '*']) {
                    return Err(invalid(
                        "{, } and * are only allowed as whole parameter segments",
                    ));
                }
                node.literals.entry((*segment).to_owned()).or_default()
            };
        }
        insert_method(&mut node.methods, method, template, value)?;
        self.len += 1;
        Ok(())
    }

    /// The route for `method` on `path`, if any. Literal segments match
    /// the request's segments after one percent-decoding (see the module
    /// docs); `path` should be the output of [`normalize_path`].
    pub fn find(&self, method: &str, path: &str) -> Option<Route<'_, T>> {
        let rest = path.strip_prefix('/')?;
        let mut buffer = [""; MAX_SEGMENTS];
        let mut count = 0;
        if !rest.is_empty() {
            for segment in rest.split('/') {
                if count == MAX_SEGMENTS {
                    return None;
                }
                buffer[count] = segment;
                count += 1;
            }
        }
        find(&self.root, &buffer[..count], method)
            .map(|(value, template)| Route { value, template })
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn insert_method<T>(
    map: &mut Methods<T>,
    method: &str,
    template: &str,
    value: T,
) -> Result<(), RouteError> {
    let method = method.to_ascii_uppercase();
    if map.contains_key(&method) {
        return Err(RouteError::Duplicate {
            method,
            template: template.to_owned(),
        });
    }
    map.insert(method, (value, template.to_owned()));
    Ok(())
}

fn find<'a, T>(node: &'a Node<T>, segments: &[&str], method: &str) -> Option<(&'a T, &'a str)> {
    let lookup = |map: &'a Methods<T>| {
        map.get(method)
            .or_else(|| map.get("*"))
            .map(|(v, t)| (v, t.as_str()))
    };
    let Some((first, rest)) = segments.split_first() else {
        return lookup(&node.methods);
    };
    // A segment that does not decode to UTF-8 equals no (UTF-8) literal.
    if let Some(literal) = decode_segment(first)
        && let Some(found) = node
            .literals
            .get(literal.as_ref())
            .and_then(|n| find(n, rest, method))
    {
        return Some(found);
    }
    if let Some(found) = node.param.as_ref().and_then(|n| find(n, rest, method)) {
        return Some(found);
    }
    lookup(&node.rest)
}

/// Why [`normalize_path`] refused a path. Each is answered with 400
/// `invalid_path` by the HTTP layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path must start with /")]
    NotAbsolute,
    /// `//` or a trailing `/`: an empty segment.
    #[error("the path has an empty segment")]
    EmptySegment,
    /// A `.` or `..` segment, written plainly or percent-encoded.
    #[error("the path has a dot segment (. or ..)")]
    DotSegment,
    /// A `%` not followed by two hexadecimal digits.
    #[error("the path has a malformed percent-escape")]
    MalformedEscape,
    /// `%2F`, `%5C` or `%00`: a slash, backslash or NUL an upstream might
    /// decode into a segment boundary.
    #[error("the path encodes a slash, backslash or NUL")]
    EncodedDelimiter,
    /// A backslash or a control character.
    #[error("the path contains a backslash or a control character")]
    ForbiddenCharacter,
    /// A `;` (a path parameter, which servlet containers strip before
    /// routing) while [`PathOptions::allow_semicolons`] is off.
    #[error("the path contains ';' (path parameters are not accepted)")]
    Semicolon,
}

impl PathError {
    /// What went wrong, to match on (the enum carries no data, so this is
    /// the error itself).
    pub fn kind(&self) -> PathError {
        *self
    }
}

/// How [`normalize_path`] treats what RFC 3986 allows but upstreams disagree
/// on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PathOptions {
    /// Accept `;` in segments. Off by default: Tomcat, Jetty and Spring strip
    /// `;...` from a segment before routing (`/admin;x/y` is `/admin/y` to
    /// them) while the gateway would see the segment `admin;x`. Turn it on
    /// only when no upstream treats `;` specially.
    pub allow_semicolons: bool,
}

impl PathOptions {
    /// Sets [`PathOptions::allow_semicolons`].
    pub fn with_semicolons(mut self, allow: bool) -> Self {
        self.allow_semicolons = allow;
        self
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3 unreserved characters: escaping them changes nothing.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The RFC 3986 §6.2.2 normal form of a request path, or why it has none
/// the gateway accepts (see the module docs and [`PathError`]).
///
/// Percent-encoded unreserved characters are decoded (`%7E` → `~`,
/// `%61` → `a`), every other escape is kept with upper-case hex digits
/// (`%3a` → `%3A`), and the result is checked for `.`/`..`/empty segments
/// after decoding, so `%2e%2e` is refused like `..`. The function is
/// idempotent, and borrows when the path is already normal.
///
/// ```
/// use gateway_mw::router::{PathError, PathOptions, normalize_path};
///
/// let o = PathOptions::default();
/// assert_eq!(normalize_path("/%61dmin/x%3a1", o).unwrap(), "/admin/x%3A1");
/// assert_eq!(normalize_path("/v1/%2e%2e/admin", o), Err(PathError::DotSegment));
/// assert_eq!(normalize_path("/admin;/x", o), Err(PathError::Semicolon));
/// // Double encoding decodes once at the upstream, to a literal `%61dmin`.
/// assert_eq!(normalize_path("/%2561dmin", o).unwrap(), "/%2561dmin");
/// ```
pub fn normalize_path(path: &str, options: PathOptions) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex_value),
                    bytes.get(i + 2).copied().and_then(hex_value),
                ) else {
                    return Err(PathError::MalformedEscape);
                };
                let decoded = hi << 4 | lo;
                if matches!(decoded, b'/' | b'\\' | 0) {
                    return Err(PathError::EncodedDelimiter);
                }
                let replacement: &[u8] = if is_unreserved(decoded) {
                    &[decoded]
                } else {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    &[b'%', HEX[usize::from(hi)], HEX[usize::from(lo)]]
                };
                if out.is_none() && replacement != &bytes[i..i + 3] {
                    out = Some(bytes[..i].to_vec());
                }
                if let Some(out) = &mut out {
                    out.extend_from_slice(replacement);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::ForbiddenCharacter),
            b if b.is_ascii_control() => return Err(PathError::ForbiddenCharacter),
            b';' if !options.allow_semicolons => return Err(PathError::Semicolon),
            _ => {}
        }
        if let Some(out) = &mut out {
            out.push(b);
        }
        i += 1;
    }
    let normal: Cow<'_, str> = match out {
        // Only ASCII was replaced by ASCII, at character boundaries.
        Some(out) => Cow::Owned(String::from_utf8(out).map_err(|_| PathError::MalformedEscape)?),
        None => Cow::Borrowed(path),
    };
    let rest = &normal[1..];
    if !rest.is_empty() {
        for segment in rest.split('/') {
            match segment {
                "" => return Err(PathError::EmptySegment),
                "." | ".." => return Err(PathError::DotSegment),
                _ => {}
            }
        }
    }
    Ok(normal)
}

/// A path segment decoded once, as an upstream decodes it; `None` when the
/// bytes are not UTF-8. A malformed escape stays as written.
pub fn decode_segment(segment: &str) -> Option<Cow<'_, str>> {
    if !segment.contains('%') {
        return Some(Cow::Borrowed(segment));
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn normal(path: &str) -> Result<String, PathError> {
        normalize_path(path, PathOptions::default()).map(Cow::into_owned)
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        assert_eq!(normal("/%61dmin/x").unwrap(), "/admin/x");
        assert_eq!(normal("/ad%6din/%7E%2d%2E%5f").unwrap(), "/admin/~-._");
        assert_eq!(normal("/a%3ab%20c%c3%a9").unwrap(), "/a%3Ab%20c%C3%A9");
        assert_eq!(normal("/%2561dmin").unwrap(), "/%2561dmin");
        assert!(matches!(
            normalize_path("/already/normal", PathOptions::default()),
            Ok(Cow::Borrowed(_))
        ));
        assert_eq!(normal("/").unwrap(), "/");
    }

    #[test]
    fn paths_without_a_safe_normal_form_are_refused() {
        for (path, error) in [
            ("admin", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("/a//b", PathError::EmptySegment),
            ("/a/", PathError::EmptySegment),
            ("/a/../b", PathError::DotSegment),
            ("/a/./b", PathError::DotSegment),
            ("/a/%2e%2E/b", PathError::DotSegment),
            ("/a/.%2e", PathError::DotSegment),
            ("/a/%2e", PathError::DotSegment),
            ("/a%2fb", PathError::EncodedDelimiter),
            ("/a%2Fb", PathError::EncodedDelimiter),
            ("/a%5cb", PathError::EncodedDelimiter),
            ("/a%00b", PathError::EncodedDelimiter),
            ("/a\\b", PathError::ForbiddenCharacter),
            ("/a%zzb", PathError::MalformedEscape),
            ("/a%4", PathError::MalformedEscape),
            ("/admin;/x", PathError::Semicolon),
            ("/a;jsessionid=1", PathError::Semicolon),
        ] {
            assert_eq!(normal(path), Err(error), "{path:?}");
        }
        let allow = PathOptions::default().with_semicolons(true);
        assert_eq!(normalize_path("/a;v=1/b", allow).unwrap(), "/a;v=1/b");
        // An encoded semicolon is data, never a parameter: kept escaped.
        assert_eq!(normal("/a%3bb").unwrap(), "/a%3Bb");
    }

    #[test]
    fn literals_match_however_they_are_escaped_but_case_matters() {
        let mut r = Router::new();
        r.insert("GET", "/admin/*rest", "admin").unwrap();
        r.insert("GET", "/x:y/{id}", "colon").unwrap();
        r.insert("GET", "/*rest", "public").unwrap();
        let route = |p: &str| r.find("GET", p).map(|m| *m.value);
        assert_eq!(route("/admin/a"), Some("admin"));
        assert_eq!(route("/%61dmin/a"), Some("admin"));
        assert_eq!(route("/x%3Ay/1"), Some("colon"));
        assert_eq!(route("/x%3ay/1"), Some("colon"));
        assert_eq!(route("/%2561dmin/a"), Some("public"));
        assert_eq!(route("/Admin/a"), Some("public"), "case-sensitive");
        assert_eq!(route("/%ff/a"), Some("public"), "not UTF-8: no literal");
        assert!(matches!(
            r.insert("GET", "/a%20b", "x"),
            Err(RouteError::InvalidTemplate { .. })
        ));
    }

    /// What a typical upstream does with the path it receives: decode every
    /// escape once, then split on `/`.
    fn upstream_segments(path: &str) -> Vec<String> {
        decode_segment(path)
            .expect("generated paths decode to UTF-8")
            .trim_start_matches('/')
            .split('/')
            .map(str::to_owned)
            .collect()
    }

    /// Paths built from the characters that matter: letters of `admin`,
    /// escapes (valid, upper/lower, of unreserved and reserved characters,
    /// double-encoded), dots, slashes, semicolons and colons.
    fn path_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("a".to_owned()),
            Just("d".to_owned()),
            Just("min".to_owned()),
            Just("A".to_owned()),
            Just(".".to_owned()),
            Just("/".to_owned()),
            Just(";".to_owned()),
            Just(":".to_owned()),
            Just("~".to_owned()),
            Just("%".to_owned()),
            Just("%25".to_owned()),
            Just("%zz".to_owned()),
            (0u8..=255, any::<bool>()).prop_map(|(b, lower)| if lower {
                format!("%{b:02x}")
            } else {
                format!("%{b:02X}")
            }),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|p| format!("/{}", p.concat()))
    }

    proptest! {
        #[test]
        fn normalizing_is_idempotent(path in path_strategy(), semis in any::<bool>()) {
            let options = PathOptions::default().with_semicolons(semis);
            if let Ok(once) = normalize_path(&path, options) {
                let twice = normalize_path(&once, options).unwrap();
                prop_assert_eq!(&twice, &once);
                prop_assert!(matches!(twice, Cow::Borrowed(_)));
            }
        }

        /// A normalized path routes the same for the gateway and for an
        /// upstream that decodes it once: the same segments, none of them
        /// a dot segment, a `;` parameter or empty, and each literal
        /// compared decoded.
        #[test]
        fn the_upstream_sees_the_segments_the_gateway_routed(path in path_strategy()) {
            let Ok(normal) = normalize_path(&path, PathOptions::default()) else {
                return Ok(());
            };
            // Only escapes of reserved or non-ASCII bytes remain.
            let bytes = normal.as_bytes();
            for (i, _) in normal.match_indices('%') {
                let v = hex_value(bytes[i + 1]).unwrap() << 4 | hex_value(bytes[i + 2]).unwrap();
                prop_assert!(!is_unreserved(v));
                prop_assert!(!bytes[i + 1].is_ascii_lowercase() && !bytes[i + 2].is_ascii_lowercase());
            }
            let Some(decoded) = decode_segment(&normal) else {
                return Ok(()); // not UTF-8: no literal matches either way
            };
            let gateway: Vec<Option<String>> = normal[1..]
                .split('/')
                .map(|s| decode_segment(s).map(Cow::into_owned))
                .collect();
            let upstream = upstream_segments(&normal);
            prop_assert_eq!(gateway.len(), upstream.len(), "{} vs {}", normal, decoded);
            for (g, u) in gateway.iter().zip(&upstream) {
                prop_assert_eq!(g.as_deref(), Some(u.as_str()));
                prop_assert!(u != "." && u != "..");
                prop_assert!(!u.contains(';') || normal.contains("%3B"));
            }
            let mut r = Router::new();
            r.insert("GET", "/admin/*rest", "admin").unwrap();
            r.insert("GET", "/*rest", "public").unwrap();
            let expected = if upstream.len() >= 2 && upstream[0] == "admin" { "admin" } else { "public" };
            if normal != "/" {
                prop_assert_eq!(r.find("GET", &normal).map(|m| *m.value), Some(expected));
            }
        }
    }
}
