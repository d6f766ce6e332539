//! A peer's identity: one ed25519 keypair that is at once its libp2p `PeerId`, its Matrix server
//! signing key (`ed25519:p2p`) and its server name (the lowercase hex of the public key).
//!
//! Because the server name *is* the public key, verifying an event needs nothing but the event:
//! no key server, no trust on first use, no DNS.

use std::fmt;
use std::str::FromStr;

use libp2p_identity::{ed25519, Keypair, PeerId};
use rand::RngCore;
use ruma::serde::Base64;
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap, PublicKeySet};
use ruma::OwnedServerName;

use crate::store::{Store, StoreError, StoreResult, Table, WriteBatch};

/// The version part of our signing key id: every peer signs with `ed25519:p2p`.
pub const KEY_VERSION: &str = "p2p";
pub const KEY_ID: &str = "ed25519:p2p";

/// Key of the identity seed in [`Table::Meta`].
const IDENTITY_KEY: &[u8] = b"identity_seed";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerNameError {
    #[error("a Hyphae server name is 64 lowercase hex characters, got {0} characters")]
    Length(usize),
    #[error("a Hyphae server name is lowercase hex")]
    NotHex,
    #[error("the server name is not a valid ed25519 public key")]
    NotAKey,
}

/// A server name that can only hold a valid ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName([u8; 32]);

impl ServerName {
    pub fn from_public_key(key: &ed25519::PublicKey) -> Self {
        Self(key.to_bytes())
    }

    pub fn public_key(&self) -> ed25519::PublicKey {
        ed25519::PublicKey::try_from_bytes(&self.0).expect("validated at construction")
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The libp2p peer that owns this server name.
    pub fn peer_id(&self) -> PeerId {
        libp2p_identity::PublicKey::from(self.public_key()).to_peer_id()
    }

    /// The server name of a peer, if its PeerId embeds an ed25519 key (every Hyphae peer's does).
    pub fn from_peer_id(peer: &PeerId) -> Option<Self> {
        const IDENTITY_HASH: u64 = 0;
        let hash = peer.as_ref();
        if hash.code() != IDENTITY_HASH {
            return None;
        }
        let key = libp2p_identity::PublicKey::try_decode_protobuf(hash.digest()).ok()?;
        Some(Self::from_public_key(&key.try_into_ed25519().ok()?))
    }

    pub fn to_matrix(&self) -> OwnedServerName {
        OwnedServerName::try_from(self.to_string())
            .expect("64 hex characters are a valid server name")
    }

    /// The verification keys of this server, in the shape ruma's signature checks want.
    pub fn public_key_map(&self) -> PublicKeyMap {
        let mut set = PublicKeySet::new();
        set.insert(KEY_ID.to_owned(), Base64::new(self.0.to_vec()));
        let mut map = PublicKeyMap::new();
        map.insert(self.to_string(), set);
        map
    }
}

impl FromStr for ServerName {
    type Err = ServerNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(ServerNameError::Length(s.len()));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ServerNameError::NotHex);
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| ServerNameError::NotHex)?;
        ed25519::PublicKey::try_from_bytes(&bytes).map_err(|_| ServerNameError::NotAKey)?;
        Ok(Self(bytes))
    }
}

impl TryFrom<&ruma::ServerName> for ServerName {
    type Error = ServerNameError;

    fn try_from(name: &ruma::ServerName) -> Result<Self, Self::Error> {
        name.as_str().parse()
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerName({self})")
    }
}

/// The keypair of this peer and the names derived from it.
pub struct Identity {
    seed: [u8; 32],
    keypair: Keypair,
    signing_key: Ed25519KeyPair,
    server_name: ServerName,
}

impl Identity {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        Self::from_seed(seed)
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        let secret =
            ed25519::SecretKey::try_from_bytes(seed).expect("any 32 bytes are a secret key");
        let ed = ed25519::Keypair::from(secret);
        let server_name = ServerName::from_public_key(&ed.public());
        let signing_key = Ed25519KeyPair::from_der(&pkcs8_v1(&seed), KEY_VERSION.to_owned())
            .expect("a well-formed PKCS#8 document parses");
        Self {
            seed,
            keypair: Keypair::from(ed),
            signing_key,
            server_name,
        }
    }

    /// Loads the identity persisted in `store`, creating and persisting one on first start.
    pub async fn load_or_create(store: &dyn Store) -> StoreResult<Self> {
        if let Some(raw) = store.get(Table::Meta, IDENTITY_KEY).await? {
            let seed: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("identity seed is not 32 bytes".into()))?;
            return Ok(Self::from_seed(seed));
        }
        let identity = Self::generate();
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, IDENTITY_KEY, identity.seed.to_vec());
        store.write(batch).await?;
        Ok(identity)
    }

    pub fn server_name(&self) -> ServerName {
        self.server_name
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    pub fn libp2p_keypair(&self) -> &Keypair {
        &self.keypair
    }

    pub fn signing_key(&self) -> &Ed25519KeyPair {
        &self.signing_key
    }
}

/// The PKCS#8 v1 DER document of an ed25519 private key (RFC 8410): a fixed 16-byte prefix and
/// the 32-byte seed.
fn pkcs8_v1(seed: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut doc = PREFIX.to_vec();
    doc.extend_from_slice(seed);
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::signatures::KeyPair as _;

    #[test]
    fn one_key_three_names() {
        let id = Identity::from_seed([7; 32]);
        let name = id.server_name();
        assert_eq!(name.to_string().len(), 64);
        assert_eq!(name.peer_id(), id.peer_id());
        assert_eq!(name.to_string().parse::<ServerName>().unwrap(), name);
        // The Matrix signing key and the libp2p key are the same key.
        let sig = id.signing_key().sign(b"hello");
        assert!(name.public_key().verify(b"hello", sig.as_bytes()));
        assert_eq!(id.to_owned_string(), name.to_string());
        // And the PeerId gives the server name back; a non-ed25519 peer has none.
        assert_eq!(ServerName::from_peer_id(&id.peer_id()), Some(name));
        let rsa_like = PeerId::random();
        assert_eq!(ServerName::from_peer_id(&rsa_like), None);
    }

    impl Identity {
        fn to_owned_string(&self) -> String {
            self.server_name.to_matrix().to_string()
        }
    }

    #[test]
    fn server_names_must_be_keys() {
        assert_eq!("abc".parse::<ServerName>(), Err(ServerNameError::Length(3)));
        let upper = "A".repeat(64);
        assert_eq!(upper.parse::<ServerName>(), Err(ServerNameError::NotHex));
        assert_eq!(
            "example.org".parse::<ServerName>(),
            Err(ServerNameError::Length(11))
        );
    }
}
