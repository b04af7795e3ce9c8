//! `{name}` placeholders in step URLs, headers and fields. Parsed once at config load
//! (so a typo is a config error naming the key), rendered per token request into
//! zeroized buffers because the values are usually secrets.

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use crate::secret::Secret;

/// Values a template can refer to: config params and secrets, a human-supplied `code`,
/// and whatever earlier steps extracted. All are treated as secret.
pub type Vars = BTreeMap<String, Secret>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template text is kept out of the message: it may hold a literal secret.
    #[error("unclosed `{{` in a template")]
    Unclosed,
    #[error("empty or invalid placeholder name in a template (use letters, digits and `_`)")]
    BadName,
    #[error("no value for `{{{0}}}`")]
    Missing(String),
}

/// The template as written (placeholders, never values).
impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.0 {
            match p {
                Part::Lit(s) => f.write_str(&s.replace('{', "{{").replace('}', "}}"))?,
                Part::Var(v) => write!(f, "{{{v}}}")?,
            }
        }
        Ok(())
    }
}

impl Template {
    /// Parse `text`; `{{` and `}}` stand for literal braces.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(ch) => name.push(ch),
                            None => return Err(TemplateError::Unclosed),
                        }
                    }
                    if name.is_empty() || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                        return Err(TemplateError::BadName);
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Var(name));
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template(parts))
    }

    /// The placeholder names used.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Lit(_) => None,
        })
    }

    pub fn uses(&self, name: &str) -> bool {
        self.vars().any(|v| v == name)
    }

    pub fn render(&self, vars: &Vars) -> Result<Zeroizing<String>, TemplateError> {
        let mut out = Zeroizing::new(String::new());
        for p in &self.0 {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(v) => match vars.get(v) {
                    Some(val) => out.push_str(val.expose()),
                    None => return Err(TemplateError::Missing(v.clone())),
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vars_and_literals() {
        let t = Template::parse("Bearer {interim}").unwrap();
        let mut v = Vars::new();
        v.insert("interim".into(), Secret::new("abc"));
        assert_eq!(t.render(&v).unwrap().as_str(), "Bearer abc");
        assert_eq!(Template::parse("{{x}}").unwrap().render(&v).unwrap().as_str(), "{x}");
    }

    #[test]
    fn errors() {
        assert!(matches!(Template::parse("{oops"), Err(TemplateError::Unclosed)));
        assert!(matches!(Template::parse("{a-b}"), Err(TemplateError::BadName)));
        let t = Template::parse("{missing}").unwrap();
        assert_eq!(t.render(&Vars::new()).unwrap_err(), TemplateError::Missing("missing".into()));
    }
}
