//! The X.224 negotiation toward the user, decided without I/O: psm requires NLA (HYBRID) and
//! answers the Connection Request itself, before TLS.
//!
//! psm never selects HYBRID_EX (it would owe the client an Early User Authorization Result) and
//! never plain TLS or standard RDP security (the user would be checked only after the target
//! was contacted, and with the password in the Client Info).

use ironrdp_core::{decode, encode_vec};
use ironrdp_pdu::nego::{
    ConnectionConfirm, ConnectionRequest, FailureCode, NegoRequestData, ResponseFlags,
    SecurityProtocol,
};
use ironrdp_pdu::x224::X224;

/// What psm answers a Connection Request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Negotiation {
    /// NLA offered: answer HYBRID, then TLS and CredSSP.
    Hybrid {
        /// The Connection Confirm to send.
        confirm: Vec<u8>,
        /// The client's `mstshash` cookie, if any (untrusted, for logs only).
        cookie: Option<String>,
    },
    /// NLA not offered: answer a Negotiation Failure and close.
    Refuse {
        /// The Negotiation Failure to send.
        failure: Vec<u8>,
        /// Why, for the audit log.
        reason: String,
    },
}

/// Decides the answer to the client's first PDU (its X.224 Connection Request).
/// `Err`: not a Connection Request at all (the connection is closed without an answer).
pub fn negotiate(frame: &[u8]) -> Result<Negotiation, String> {
    let cr = decode::<X224<ConnectionRequest>>(frame)
        .map_err(|e| format!("not an X.224 Connection Request: {e}"))?
        .0;
    let cookie = match &cr.nego_data {
        Some(NegoRequestData::Cookie(c)) => Some(c.0.clone()),
        _ => None,
    };
    if cr.protocol.contains(SecurityProtocol::HYBRID)
        || cr.protocol.contains(SecurityProtocol::HYBRID_EX)
    {
        let confirm = encode_vec(&X224(ConnectionConfirm::Response {
            flags: ResponseFlags::EXTENDED_CLIENT_DATA_SUPPORTED,
            protocol: SecurityProtocol::HYBRID,
        }))
        .map_err(|e| e.to_string())?;
        return Ok(Negotiation::Hybrid { confirm, cookie });
    }
    let failure = encode_vec(&X224(ConnectionConfirm::Failure {
        code: FailureCode::HYBRID_REQUIRED_BY_SERVER,
    }))
    .map_err(|e| e.to_string())?;
    Ok(Negotiation::Refuse {
        failure,
        reason: format!(
            "client did not offer NLA (requested protocols {}); psm requires NLA",
            describe(cr.protocol)
        ),
    })
}

/// The protocol bits in words.
pub fn describe(p: SecurityProtocol) -> String {
    if p.is_empty() {
        return "standard RDP security".into();
    }
    let mut names = Vec::new();
    for (bit, name) in [
        (SecurityProtocol::SSL, "SSL"),
        (SecurityProtocol::HYBRID, "HYBRID"),
        (SecurityProtocol::RDSTLS, "RDSTLS"),
        (SecurityProtocol::HYBRID_EX, "HYBRID_EX"),
        (SecurityProtocol::RDSAAD, "RDSAAD"),
    ] {
        if p.contains(bit) {
            names.push(name);
        }
    }
    if names.is_empty() {
        format!("{:#x}", p.bits())
    } else {
        names.join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironrdp_pdu::nego::RequestFlags;

    fn request(protocol: SecurityProtocol) -> Vec<u8> {
        encode_vec(&X224(ConnectionRequest {
            nego_data: Some(NegoRequestData::cookie("alice".into())),
            flags: RequestFlags::empty(),
            protocol,
            correlation_info: None,
        }))
        .expect("encodes")
    }

    #[test]
    fn nla_is_answered_with_hybrid_and_anything_else_refused() {
        let Ok(Negotiation::Hybrid { confirm, cookie }) =
            negotiate(&request(SecurityProtocol::SSL | SecurityProtocol::HYBRID))
        else {
            panic!("hybrid expected");
        };
        assert_eq!(cookie.as_deref(), Some("alice"));
        let cc = decode::<X224<ConnectionConfirm>>(&confirm)
            .expect("decodes")
            .0;
        assert_eq!(
            cc,
            ConnectionConfirm::Response {
                flags: ResponseFlags::EXTENDED_CLIENT_DATA_SUPPORTED,
                protocol: SecurityProtocol::HYBRID
            }
        );
        // HYBRID_EX alone is answered with plain HYBRID
        assert!(matches!(
            negotiate(&request(SecurityProtocol::HYBRID_EX)),
            Ok(Negotiation::Hybrid { .. })
        ));
        for p in [SecurityProtocol::SSL, SecurityProtocol::empty()] {
            let Ok(Negotiation::Refuse { failure, reason }) = negotiate(&request(p)) else {
                panic!("refusal expected");
            };
            assert!(reason.contains("requires NLA"), "{reason}");
            let cc = decode::<X224<ConnectionConfirm>>(&failure)
                .expect("decodes")
                .0;
            assert_eq!(
                cc,
                ConnectionConfirm::Failure {
                    code: FailureCode::HYBRID_REQUIRED_BY_SERVER
                }
            );
        }
        assert!(negotiate(&[3, 0, 0, 7, 2, 0xf0, 0x80]).is_err());
        assert!(negotiate(&[]).is_err());
    }
}
