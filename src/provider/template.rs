//! Shim: templates moved to the leaf module [`crate::template`]. Kept so that code not
//! yet updated (`token::refresher`) still builds; remove once nothing imports this path.

pub use crate::template::{Template, TemplateError, Vars};
