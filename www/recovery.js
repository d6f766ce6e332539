// Encrypted history that outlives a browser: on first run the app sets up cross-signing,
// secret storage and server-side key backup under a recovery key, and every room key is backed
// up (encrypted; the homeserver cannot read it). The recovery key is kept with the session, so
// it travels in the profile's export file, and Settings shows it to write down. A profile
// restored elsewhere signs in as a new device and restores the backup with that key, so the
// history from before reads there too.
import { decodeRecoveryKey } from "matrix-js-sdk/lib/crypto-api/recovery-key.js";
import { forgetImportedRoomKeys, importedRoomKeys, loadSession, saveSession } from "./profile.js";

/** The recovery key this profile knows (encoded, as shown to people), if any. */
export function recoveryKey() {
  return loadSession()?.recovery_key ?? null;
}

/** For the client's `cryptoCallbacks`: the secret storage key, from this profile's recovery key. */
export const cryptoCallbacks = {
  async getSecretStorageKey({ keys }) {
    const encoded = pending?.encodedPrivateKey ?? recoveryKey();
    const keyId = Object.keys(keys)[0];
    if (!encoded || !keyId) return null;
    return [keyId, pending?.privateKey ?? decodeRecoveryKey(encoded)];
  },
};

/**
 * Takes a recovery key typed in by hand, once it is known to open this account's secret
 * storage; resolves to whether it did.
 */
export async function useRecoveryKey(client, encoded) {
  let privateKey;
  try {
    privateKey = decodeRecoveryKey(encoded.trim());
  } catch {
    return false;
  }
  const found = await client.secretStorage.getKey();
  if (!found || !(await client.secretStorage.checkKey(privateKey, found[1]))) return false;
  saveSession({ ...loadSession(), recovery_key: encoded.trim() });
  return true;
}

/** Imports the room keys an imported profile's file brought; resolves to how many. */
async function importFileKeys(crypto) {
  const keys = importedRoomKeys();
  if (!keys) return 0;
  await crypto.importRoomKeysAsJson(keys);
  forgetImportedRoomKeys();
  return JSON.parse(keys).length;
}

/** A key being created, until it is saved with the session. */
let pending = null;

/**
 * Makes sure this device's room keys are backed up and the backup is readable here: sets
 * everything up on a first run, or restores the backup on a device that has the recovery key
 * but not the keys. Runs after the chat is on screen; resolves to what it did.
 */
export async function secureHistory(client) {
  const crypto = client.getCrypto();
  const fromFile = await importFileKeys(crypto);
  const backup = await crypto.getKeyBackupInfo();
  const key = recoveryKey();
  if (!backup || !key) {
    if (backup && !key) return "needs the recovery key";
    pending = await crypto.createRecoveryKeyFromPassphrase();
    // The first upload of cross-signing keys needs no password (there were none before).
    await crypto.bootstrapCrossSigning({ authUploadDeviceSigningKeys: (makeRequest) => makeRequest(null) });
    await crypto.bootstrapSecretStorage({
      createSecretStorageKey: async () => pending,
      setupNewSecretStorage: true,
      setupNewKeyBackup: true,
    });
    saveSession({ ...loadSession(), recovery_key: pending.encodedPrivateKey });
    pending = null;
    return "set up";
  }
  if ((await crypto.getActiveSessionBackupVersion()) && (await crypto.getSessionBackupPrivateKey())) return "backing up";
  // A new device of this profile: the backup key comes from secret storage, and the room keys
  // from the backup.
  await crypto.loadSessionBackupPrivateKeyFromSecretStorage();
  const { total, imported } = await crypto.restoreKeyBackup();
  console.info(`key backup ${backup.version} (${backup.count} keys): restored ${imported} of ${total}`);
  // Then this device takes the identity's cross-signing keys from secret storage and signs
  // itself, which makes the backup trusted here, so this device's own keys are backed up too.
  // The identity must be known first, or the crypto stack would make a new one.
  let trusted = "";
  try {
    await crypto.getUserDeviceInfo([client.getUserId()], true);
    await crypto.bootstrapCrossSigning({
      authUploadDeviceSigningKeys: () => Promise.reject(new Error("the identity's keys are in secret storage")),
    });
    trusted = (await crypto.checkKeyBackupAndEnable())?.backupInfo ? ", backing up" : "";
  } catch (err) {
    console.warn("this device is not cross-signed:", err);
  }
  const file = fromFile ? `${fromFile} keys from the file, ` : "";
  return `${file}restored ${imported} of ${total} keys${trusted}`;
}
