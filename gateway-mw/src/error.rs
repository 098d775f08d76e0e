//! The crate's error type: [`Error`], with [`Error::kind`] to match on and
//! the underlying error kept as its [`source`](std::error::Error::source).

/// Any failure at the crate's boundary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The gateway's configuration was refused (feature `proxy`).
    #[cfg(feature = "proxy")]
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The listening socket could not be bound (feature `proxy`).
    #[cfg(feature = "proxy")]
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A password could not be hashed ([`config::hash_password`](crate::config::hash_password)).
    #[cfg(feature = "proxy")]
    #[error("cannot hash the password: {source}")]
    PasswordHash {
        /// Argon2's error.
        #[source]
        source: argon2::password_hash::Error,
    },
    /// The operating system's random number generator failed.
    #[error("random number generator unavailable: {0}")]
    Random(#[source] getrandom::Error),
    /// The audit log could not be opened, started or closed.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// Issuing, refreshing or revoking a token failed.
    #[error(transparent)]
    Token(#[from] crate::token::TokenError),
}

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::Config`], with the configuration error's own kind.
    #[cfg(feature = "proxy")]
    Config(crate::config::ConfigErrorKind),
    /// [`Error::Bind`].
    #[cfg(feature = "proxy")]
    Bind,
    /// [`Error::PasswordHash`].
    #[cfg(feature = "proxy")]
    PasswordHash,
    /// [`Error::Random`].
    Random,
    /// [`Error::Audit`], with the audit error's own kind.
    Audit(crate::audit::AuditErrorKind),
    /// [`Error::Token`], with the token error's own kind.
    Token(crate::token::TokenErrorKind),
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            #[cfg(feature = "proxy")]
            Error::Config(e) => ErrorKind::Config(e.kind()),
            #[cfg(feature = "proxy")]
            Error::Bind { .. } => ErrorKind::Bind,
            #[cfg(feature = "proxy")]
            Error::PasswordHash { .. } => ErrorKind::PasswordHash,
            Error::Random(_) => ErrorKind::Random,
            Error::Audit(e) => ErrorKind::Audit(e.kind()),
            Error::Token(e) => ErrorKind::Token(e.kind()),
        }
    }
}
