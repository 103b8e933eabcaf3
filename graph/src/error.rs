//! The one error type that crosses crate boundaries: a TensorFlow status code and a message.

use serde::{Deserialize, Serialize};
use std::fmt;

/// TensorFlow's canonical status codes, with the same numbers so they keep their meaning on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Code {
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// The code for a wire number; unknown numbers map to `Unknown` rather than failing.
    pub fn from_u8(v: u8) -> Code {
        use Code::*;
        match v {
            1 => Cancelled,
            3 => InvalidArgument,
            4 => DeadlineExceeded,
            5 => NotFound,
            6 => AlreadyExists,
            7 => PermissionDenied,
            8 => ResourceExhausted,
            9 => FailedPrecondition,
            10 => Aborted,
            11 => OutOfRange,
            12 => Unimplemented,
            13 => Internal,
            14 => Unavailable,
            15 => DataLoss,
            16 => Unauthenticated,
            _ => Unknown,
        }
    }
}

/// A failed status: what went wrong (`code`) and where (`msg` names the op, node, file or peer).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    pub code: Code,
    pub msg: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

macro_rules! ctor {
    ($($fn:ident => $code:ident),* $(,)?) => {
        impl Error {
            $(
                #[doc = concat!("An error with code `", stringify!($code), "`.")]
                pub fn $fn(msg: impl Into<String>) -> Error {
                    Error { code: Code::$code, msg: msg.into() }
                }
            )*
        }
    };
}

ctor! {
    cancelled => Cancelled,
    unknown => Unknown,
    invalid_argument => InvalidArgument,
    deadline_exceeded => DeadlineExceeded,
    not_found => NotFound,
    already_exists => AlreadyExists,
    permission_denied => PermissionDenied,
    resource_exhausted => ResourceExhausted,
    failed_precondition => FailedPrecondition,
    aborted => Aborted,
    out_of_range => OutOfRange,
    unimplemented => Unimplemented,
    internal => Internal,
    unavailable => Unavailable,
    data_loss => DataLoss,
    unauthenticated => Unauthenticated,
}

impl Error {
    pub fn new(code: Code, msg: impl Into<String>) -> Error {
        Error { code, msg: msg.into() }
    }

    /// The same error with `context` put in front of its message ("node x: ...").
    pub fn context(self, context: impl fmt::Display) -> Error {
        Error { code: self.code, msg: format!("{context}: {}", self.msg) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.msg)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        use std::io::ErrorKind::*;
        let code = match e.kind() {
            NotFound => Code::NotFound,
            PermissionDenied => Code::PermissionDenied,
            AlreadyExists => Code::AlreadyExists,
            TimedOut => Code::DeadlineExceeded,
            UnexpectedEof => Code::OutOfRange,
            ConnectionRefused | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
                Code::Unavailable
            }
            InvalidInput | InvalidData => Code::InvalidArgument,
            _ => Code::Unknown,
        };
        Error::new(code, e.to_string())
    }
}

/// Returns early with an `InvalidArgument` error when the condition fails.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Error::invalid_argument(format!($($fmt)+)));
        }
    };
}
