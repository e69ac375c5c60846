//! `#[derive(Params)]`: a plugin component declares each parameter once, as a field of its
//! parameter struct, and the derive produces the schema the host checks configs against
//! (`ParamSpec`s: name, type, default, range, choices and doc), as clap's derive does for
//! command lines. The struct still derives `serde::Deserialize` for the typed values.
//!
//! ```ignore
//! #[derive(Debug, Deserialize, Params)]
//! #[serde(deny_unknown_fields)]
//! pub struct SamParams {
//!     /// neighbourhood radius ρ
//!     #[param(default = 0.05, min = 0.0)]
//!     pub rho: f64,
//!     /// `official` or `davda54`
//!     #[param(default = "official", choices = ["official", "davda54"])]
//!     pub variant: String,
//! }
//! ```
//!
//! A parameter added to a component that has already been released is marked `added_later`
//! (`#[param(default = false, added_later)]`, with `#[serde(default)]` on the field): at its
//! default it stays out of the resolved config, so jobs that existed before keep their
//! identities.
//!
//! Every field needs a doc comment and `default`. The type comes from the field's Rust type
//! (`f32`/`f64` float, integers int, `bool`, `String`); a field of another type (an enum that
//! deserializes from a string) names its `choices`, which makes it a string parameter.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as Tokens};
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, Expr, Fields, Lit, Meta};

#[proc_macro_derive(Params, attributes(param))]
pub fn derive_params(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// One field's `#[param(...)]`.
#[derive(Default)]
struct Attr {
    default: Option<Expr>,
    min: Option<Expr>,
    max: Option<Expr>,
    choices: Vec<String>,
    name: Option<String>,
    added_later: bool,
}

fn expand(input: &DeriveInput) -> syn::Result<Tokens> {
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(&input.ident, "#[derive(Params)] needs a struct of named fields"));
    };
    let fields = match &data.fields {
        Fields::Named(f) => f.named.iter().collect::<Vec<_>>(),
        Fields::Unit => Vec::new(),
        Fields::Unnamed(f) => {
            return Err(syn::Error::new_spanned(f, "#[derive(Params)] needs named fields: each is a parameter"))
        }
    };
    let mut specs = Vec::new();
    for field in fields {
        let ident = field.ident.as_ref().expect("named field");
        let attr = param_attr(field)?;
        let name = attr.name.clone().unwrap_or_else(|| ident.to_string().trim_start_matches("r#").to_string());
        let doc = doc_of(field);
        if doc.is_empty() {
            return Err(syn::Error::new_spanned(ident, "document the parameter: its doc comment is what users read"));
        }
        let Some(default) = &attr.default else {
            return Err(syn::Error::new_spanned(ident, "give the parameter a default: #[param(default = ...)]"));
        };
        let ty = if attr.choices.is_empty() { param_type(&field.ty)? } else { quote!(String) };
        let min = option(&attr.min);
        let max = option(&attr.max);
        let choices = &attr.choices;
        let added_later = attr.added_later;
        specs.push(quote! {
            ::xlab_plugin_api::ParamSpec {
                name: #name.to_string(),
                ty: ::xlab_plugin_api::ParamType::#ty,
                default: ::xlab_plugin_api::__private::serde_json::json!(#default),
                doc: #doc.to_string(),
                min: #min,
                max: #max,
                choices: vec![#(#choices.to_string()),*],
                added_later: #added_later,
            }
        });
    }
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics ::xlab_plugin_api::ParamList for #name #ty_generics #where_clause {
            fn param_specs() -> ::std::vec::Vec<::xlab_plugin_api::ParamSpec> {
                vec![#(#specs),*]
            }
        }
    })
}

fn option(e: &Option<Expr>) -> Tokens {
    match e {
        Some(e) => quote!(Some((#e) as f64)),
        None => quote!(None),
    }
}

/// The joined `///` lines of a field, trimmed.
fn doc_of(field: &syn::Field) -> String {
    let mut lines = Vec::new();
    for a in &field.attrs {
        if let Meta::NameValue(nv) = &a.meta {
            if nv.path.is_ident("doc") {
                if let Expr::Lit(syn::ExprLit { lit: Lit::Str(s), .. }) = &nv.value {
                    lines.push(s.value().trim().to_string());
                }
            }
        }
    }
    lines.join(" ").trim().to_string()
}

fn param_attr(field: &syn::Field) -> syn::Result<Attr> {
    let mut out = Attr::default();
    for a in field.attrs.iter().filter(|a| a.path().is_ident("param")) {
        a.parse_nested_meta(|m| {
            let key = m.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
            match key.as_str() {
                "default" => out.default = Some(m.value()?.parse()?),
                "min" => out.min = Some(m.value()?.parse()?),
                "max" => out.max = Some(m.value()?.parse()?),
                "name" => out.name = Some(m.value()?.parse::<syn::LitStr>()?.value()),
                "added_later" => out.added_later = true,
                "choices" => {
                    let list: syn::ExprArray = m.value()?.parse()?;
                    for e in list.elems {
                        match e {
                            Expr::Lit(syn::ExprLit { lit: Lit::Str(s), .. }) => out.choices.push(s.value()),
                            other => return Err(syn::Error::new_spanned(other, "choices are string literals")),
                        }
                    }
                }
                _ => return Err(m.error("expected default, min, max, choices, name or added_later")),
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// `Float`, `Int`, `Bool` or `String` from the field's Rust type.
fn param_type(ty: &syn::Type) -> syn::Result<Tokens> {
    let syn::Type::Path(p) = ty else {
        return Err(syn::Error::new_spanned(ty, "a parameter is a number, bool or String (or names its choices)"));
    };
    let last = p.path.segments.last().map(|s| s.ident.to_string()).unwrap_or_default();
    let kind = match last.as_str() {
        "f32" | "f64" => "Float",
        "u8" | "u16" | "u32" | "u64" | "usize" | "i8" | "i16" | "i32" | "i64" | "isize" => "Int",
        "bool" => "Bool",
        "String" => "String",
        _ => {
            return Err(syn::Error::new_spanned(
                ty,
                "a parameter is a number, bool or String; a string-valued enum names its choices: \
                 #[param(choices = [\"a\", \"b\"])]",
            ))
        }
    };
    let ident = syn::Ident::new(kind, Span::call_site());
    Ok(quote!(#ident))
}
