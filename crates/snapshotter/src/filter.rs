//! containerd's filter syntax, as used by `List`:
//!
//! ```text
//! filter   := selector ("," selector)*          all selectors must match
//! selector := fieldpath [op value]               no op: the field is present
//! fieldpath:= field ("." field)*
//! field    := quoted | [A-Za-z0-9_]+
//! op       := "==" | "!=" | "~="                 ~= is a regular expression match
//! value    := quoted | anything up to ","
//! quoted   := "…" | /…/ | |…|                    backslash escapes
//! ```
//! A request may carry several filter strings; an item matches if any does.

use regex::Regex;

/// A parse error, with the offending input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid filter {}: {reason}", crate::shown::shown(input))]
pub struct FilterError {
    input: String,
    reason: String,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A set of filter strings: matches if any string's selectors all match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

/// Something whose fields a filter can look at.
pub trait Fields {
    /// The value at `path` (e.g. `["labels", "foo"]`), or `None` if absent.
    fn field(&self, path: &[String]) -> Option<&str>;
}

impl Filter {
    /// Parses filter strings; empty strings are ignored and no strings match everything.
    pub fn parse<S: AsRef<str>>(inputs: &[S]) -> Result<Filter, FilterError> {
        let any = inputs
            .iter()
            .map(AsRef::as_ref)
            .filter(|s| !s.trim().is_empty())
            .map(|s| Parser { input: s, pos: 0 }.parse())
            .collect::<Result<_, _>>()?;
        Ok(Filter { any })
    }

    /// Whether `item` matches.
    pub fn matches(&self, item: &impl Fields) -> bool {
        self.any.is_empty() || self.any.iter().any(|all| all.iter().all(|s| s.matches(item)))
    }
}

impl Selector {
    fn matches(&self, item: &impl Fields) -> bool {
        let value = item.field(&self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value == Some(v.as_str()),
            // As in containerd: an absent field counts as the empty string here.
            Op::NotEqual(v) => value.unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.unwrap_or("")),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, reason: impl Into<String>) -> FilterError {
        // A regular expression's error repeats the whole expression.
        let reason = reason.into();
        let reason = crate::shown::clipped(&reason).map_or_else(|| reason.clone(), |start| format!("{start}…"));
        FilterError { input: self.input.to_owned(), reason: format!("{reason} at offset {}", self.pos) }
    }

    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, s: &str) -> bool {
        if self.input[self.pos..].starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    fn parse(mut self) -> Result<Vec<Selector>, FilterError> {
        let mut out = vec![self.selector()?];
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Ok(out),
                Some(',') => {
                    self.pos += 1;
                    out.push(self.selector()?);
                }
                Some(c) => return Err(self.err(format!("unexpected {c:?}"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        self.skip_ws();
        let mut path = vec![self.field()?];
        while self.eat(".") {
            path.push(self.field()?);
        }
        self.skip_ws();
        let op = if self.eat("==") {
            Op::Equal(self.value()?)
        } else if self.eat("!=") {
            Op::NotEqual(self.value()?)
        } else if self.eat("~=") {
            let v = self.value()?;
            Op::Matches(Regex::new(&v).map_err(|e| self.err(format!("bad regular expression: {e}")))?)
        } else if matches!(self.peek(), None | Some(',')) {
            Op::Present
        } else {
            return Err(self.err("expected an operator (==, !=, ~=)"));
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        if let Some(q) = self.peek().filter(|c| matches!(c, '"' | '/' | '|')) {
            return self.quoted(q);
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| c == '_' || c.is_ascii_alphanumeric()) {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(self.err("expected a field name"));
        }
        Ok(self.input[start..self.pos].to_owned())
    }

    fn value(&mut self) -> Result<String, FilterError> {
        self.skip_ws();
        if let Some(q) = self.peek().filter(|c| matches!(c, '"' | '/' | '|')) {
            return self.quoted(q);
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| c != ',') {
            self.pos += self.peek().map_or(1, char::len_utf8);
        }
        let v = self.input[start..self.pos].trim();
        if v.is_empty() {
            return Err(self.err("expected a value"));
        }
        Ok(v.to_owned())
    }

    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else { return Err(self.err("unterminated quote")) };
            self.pos += c.len_utf8();
            match c {
                c if c == quote => return Ok(out),
                '\\' => {
                    let Some(e) = self.peek() else { return Err(self.err("unterminated escape")) };
                    self.pos += e.len_utf8();
                    match (quote, e) {
                        (_, e) if e == quote || e == '\\' && quote == '"' => out.push(e),
                        ('"', 'n') => out.push('\n'),
                        ('"', 't') => out.push('\t'),
                        (_, e) => {
                            out.push('\\');
                            out.push(e);
                        }
                    }
                }
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Item {
        name: &'static str,
        parent: &'static str,
        labels: HashMap<&'static str, &'static str>,
    }

    impl Fields for Item {
        fn field(&self, path: &[String]) -> Option<&str> {
            match path {
                [f] if f == "name" => Some(self.name),
                [f] if f == "parent" => Some(self.parent),
                [f, k] if f == "labels" => self.labels.get(k.as_str()).copied(),
                _ => None,
            }
        }
    }

    fn item(name: &'static str, parent: &'static str, labels: &[(&'static str, &'static str)]) -> Item {
        Item { name, parent, labels: labels.iter().copied().collect() }
    }

    fn m(filters: &[&str], it: &Item) -> bool {
        Filter::parse(filters).expect("valid filter").matches(it)
    }

    #[test]
    fn equality_presence_and_quoting() {
        let it = item("a-wl", "p-wl", &[("l", "2"), ("containerd.io/gc.root", "check-walk")]);
        assert!(m(&["name==a-wl"], &it));
        assert!(!m(&["name==a"], &it));
        assert!(m(&["name==a-wl,labels.l"], &it));
        assert!(!m(&["labels.missing"], &it));
        assert!(m(&[r#"labels."containerd.io/gc.root"==check-walk"#], &it));
        assert!(m(&[r#"parent!="",labels.l==2"#], &it));
        assert!(m(&["labels.l == 2"], &it));
    }

    #[test]
    fn or_across_strings_and_across_selectors() {
        let it = item("p", "", &[]);
        assert!(m(&["name==x", "name==p"], &it));
        assert!(!m(&["name==x", "name==y"], &it));
        assert!(!m(&["name==p,name==x"], &it));
        assert!(m(&[], &it));
        assert!(m(&[""], &it));
    }

    #[test]
    fn not_equal_treats_absent_as_empty() {
        let it = item("p", "", &[]);
        assert!(!m(&[r#"parent!="""#], &it));
        assert!(m(&["labels.x!=y"], &it));
    }

    #[test]
    fn regex_match() {
        let it = item("layer-12", "", &[("tier", "gold")]);
        assert!(m(&["name~=^layer-[0-9]+$"], &it));
        assert!(m(&["labels.tier~=/go.d/"], &it));
        assert!(!m(&["name~=^x"], &it));
    }

    #[test]
    fn rejects_bad_filters() {
        for bad in ["==x", "name=x", "name==", r#"labels."unterminated"#, "name~=(", "name==a,", ".x", "name==a b,,c"] {
            assert!(Filter::parse(&[bad]).is_err(), "{bad} should not parse");
        }
    }
}
