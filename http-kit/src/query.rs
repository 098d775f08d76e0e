//! Query strings, decoded as `application/x-www-form-urlencoded` by the
//! `form_urlencoded` crate: `%XX` escapes anywhere (`minutes=%36%30` is
//! `minutes=60`), `+` as a space, and malformed escapes kept literally (so
//! `since=%zz` is the string `"%zz"`, which the caller's own validation then
//! refuses with a clear error, rather than the parameter silently vanishing).

use std::borrow::Cow;

/// A parsed query string.
///
/// ```
/// let query = http_kit::Query::parse(Some("minutes=%36%30&tag=a+b&tag=c"));
/// assert_eq!(query.get("minutes"), Some("60"));
/// assert_eq!(query.get("tag"), Some("a b"));
/// assert_eq!(query.get_all("tag").collect::<Vec<_>>(), ["a b", "c"]);
/// assert_eq!(query.get("missing"), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Query<'a> {
    /// Parses `query` (the part of the URI after `?`, as
    /// [`http::Uri::query`] gives it). `None` is an empty query.
    pub fn parse(query: Option<&'a str>) -> Query<'a> {
        let pairs = query
            .map(|q| form_urlencoded::parse(q.as_bytes()).collect())
            .unwrap_or_default();
        Query { pairs }
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    /// Whether `name` appears at all (with or without a value).
    pub fn contains(&self, name: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == name)
    }

    /// Every pair, decoded, in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_decode_in_names_and_values() {
        let q = Query::parse(Some("%6Dinutes=%36%30&access_token=a.b%2Ec&flag"));
        assert_eq!(q.get("minutes"), Some("60"));
        assert_eq!(q.get("access_token"), Some("a.b.c"));
        assert_eq!(q.get("flag"), Some(""));
        assert!(q.contains("flag"));
    }

    #[test]
    fn malformed_escapes_stay_literal_for_the_caller_to_refuse() {
        let q = Query::parse(Some("since=%zz&x=%"));
        assert_eq!(q.get("since"), Some("%zz"));
        assert_eq!(q.get("x"), Some("%"));
        assert_eq!(Query::parse(None).get("since"), None);
    }
}
