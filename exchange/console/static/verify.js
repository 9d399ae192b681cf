// Verifies an audit log entry in the browser, independently of the server's own answer:
//  1. the checkpoint note (C2SP signed-note + tlog-checkpoint) carries a valid Ed25519
//     signature by the pinned log key (Web Crypto Ed25519), key ID included;
//  2. the entry's leaf hash SHA-256(0x00 || leaf bytes) folds with the inclusion proof to the
//     checkpoint's root (RFC 9162 section 2.1.3.2);
//  3. an earlier signed checkpoint is consistent with it (RFC 9162 section 2.1.4.2).
// Every step is reported; any failure makes the verdict FAILED. The functions are exposed as
// window.hxVerify so that tests can run them against reference proofs.
(function () {
  "use strict";
  var enc = new TextEncoder();

  function b64decode(text) {
    var raw = atob(text);
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }
  function b64encode(bytes) {
    var s = "";
    for (var i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
    return btoa(s);
  }
  function concat() {
    var total = 0, i;
    for (i = 0; i < arguments.length; i++) total += arguments[i].length;
    var out = new Uint8Array(total), at = 0;
    for (i = 0; i < arguments.length; i++) { out.set(arguments[i], at); at += arguments[i].length; }
    return out;
  }
  function equal(a, b) {
    if (a.length !== b.length) return false;
    for (var i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
    return true;
  }
  async function sha256(bytes) { return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)); }
  function leafHash(leaf) { return sha256(concat(new Uint8Array([0]), leaf)); }
  function nodeHash(left, right) { return sha256(concat(new Uint8Array([1]), left, right)); }
  function hashes(list) {
    for (var i = 0; i < list.length; i++) if (list[i].length !== 32) return false;
    return true;
  }
  function lsb(n) { return n % 2 === 1; }
  function half(n) { return Math.floor(n / 2); }

  // RFC 9162 2.1.3.2: the root that `proof` leads to from leaf `index` of a tree of `size`.
  async function rootFromInclusion(index, size, leaf, proof) {
    if (index >= size) throw new Error("index " + index + " is not below size " + size);
    if (!hashes([leaf].concat(proof))) throw new Error("a hash in the proof is not 32 bytes");
    var fn = index, sn = size - 1, r = leaf;
    for (var i = 0; i < proof.length; i++) {
      var p = proof[i];
      if (sn === 0) throw new Error("inclusion proof is too long");
      if (lsb(fn) || fn === sn) {
        r = await nodeHash(p, r);
        if (!lsb(fn)) { while (!lsb(fn) && fn !== 0) { fn = half(fn); sn = half(sn); } }
      } else {
        r = await nodeHash(r, p);
      }
      fn = half(fn); sn = half(sn);
    }
    if (sn !== 0) throw new Error("inclusion proof is too short");
    return r;
  }

  async function verifyInclusion(index, size, leaf, proof, root) {
    return root.length === 32 && equal(await rootFromInclusion(index, size, leaf, proof), root);
  }

  // RFC 9162 2.1.4.2: is the tree of size `first` (root firstRoot) a prefix of `second`?
  async function verifyConsistency(first, second, firstRoot, secondRoot, proof) {
    if (first <= 0 || first > second) return false;  // from the empty tree proves nothing
    if (first === second) return proof.length === 0 && equal(firstRoot, secondRoot);
    if (proof.length === 0) return false;
    if (!hashes([firstRoot, secondRoot].concat(proof))) return false;
    var path = proof.slice();
    if ((first & (first - 1)) === 0 && first < 4294967296) path.unshift(firstRoot);
    var fn = first - 1, sn = second - 1;
    while (lsb(fn)) { fn = half(fn); sn = half(sn); }
    var fr = path[0], sr = path[0];
    for (var i = 1; i < path.length; i++) {
      var c = path[i];
      if (sn === 0) return false;
      if (lsb(fn) || fn === sn) {
        fr = await nodeHash(c, fr); sr = await nodeHash(c, sr);
        if (!lsb(fn)) { while (!lsb(fn) && fn !== 0) { fn = half(fn); sn = half(sn); } }
      } else {
        sr = await nodeHash(sr, c);
      }
      fn = half(fn); sn = half(sn);
    }
    return sn === 0 && equal(fr, firstRoot) && equal(sr, secondRoot);
  }

  // C2SP signed note: the text ends at the last blank line; signature lines follow it.
  async function verifyCheckpoint(note, keyName, publicKey, origin) {
    var cut = note.lastIndexOf("\n\n");
    if (cut < 0) throw new Error("checkpoint: no blank line before the signatures");
    var text = note.slice(0, cut + 1);
    var lines = note.slice(cut + 2).split("\n").filter(function (l) { return l.length > 0; });
    var keyId = (await sha256(concat(enc.encode(keyName), new Uint8Array([10, 1]), publicKey))).slice(0, 4);
    var key = await crypto.subtle.importKey("raw", publicKey, {name: "Ed25519"}, false, ["verify"]);
    var verified = false, others = [];
    for (var i = 0; i < lines.length; i++) {
      var m = /^\u2014 (\S+) (\S+)$/.exec(lines[i]);
      if (!m) throw new Error("checkpoint: malformed signature line " + (i + 1));
      var raw = b64decode(m[2]);
      if (m[1] !== keyName || !equal(raw.slice(0, 4), keyId)) { others.push(m[1]); continue; }
      if (verified) continue;
      var ok = await crypto.subtle.verify({name: "Ed25519"}, key, raw.slice(4), enc.encode(text));
      if (!ok) throw new Error("checkpoint: the log key's signature does not verify");
      verified = true;
    }
    if (!verified) throw new Error("checkpoint: no signature by the pinned log key " + keyName);
    var body = text.split("\n");
    if (body.length < 4) throw new Error("checkpoint: needs origin, size and root lines");
    if (origin && body[0] !== origin) throw new Error("checkpoint: origin " + body[0] + " is not " + origin);
    if (!/^(0|[1-9][0-9]*)$/.test(body[1])) throw new Error("checkpoint: bad size line");
    return {origin: body[0], size: Number(body[1]), root: b64decode(body[2]), others: others, note: note};
  }

  // C2SP tlog-cosignature (cosignature/v1): each pinned witness vkey
  // `<name>+<hex key ID>+<base64(0x04 || key)>`; its first line on the note must verify over
  // "cosignature/v1\ntime <t>\n" + the checkpoint body, where the line carries t (u64 BE) || sig.
  async function verifyCosignatures(note, vkeys) {
    var cut = note.lastIndexOf("\n\n");
    if (cut < 0) throw new Error("checkpoint: no blank line before the signatures");
    var body = note.slice(0, cut + 1);
    var lines = note.slice(cut + 2).split("\n").filter(function (l) { return l.length > 0; });
    var out = {signed: [], missing: [], bad: []};
    for (var w = 0; w < vkeys.length; w++) {
      var parts = vkeys[w].split("+");
      var name = parts[0], raw = b64decode(parts.slice(2).join("+"));
      if (raw.length !== 33 || raw[0] !== 4) { out.bad.push(name + " (not a cosignature/v1 key)"); continue; }
      var publicKey = raw.slice(1);
      var keyId = (await sha256(concat(enc.encode(name), new Uint8Array([10, 4]), publicKey))).slice(0, 4);
      var line = null;
      for (var i = 0; i < lines.length && line === null; i++) {
        var m = /^\u2014 (\S+) (\S+)$/.exec(lines[i]);
        if (m && m[1] === name) {
          var sig = b64decode(m[2]);
          if (equal(sig.slice(0, 4), keyId)) line = sig.slice(4);
        }
      }
      if (line === null) { out.missing.push(name); continue; }
      if (line.length !== 72) { out.bad.push(name); continue; }
      var time = 0;
      for (var b = 0; b < 8; b++) time = time * 256 + line[b];
      var key = await crypto.subtle.importKey("raw", publicKey, {name: "Ed25519"}, false, ["verify"]);
      var message = enc.encode("cosignature/v1\ntime " + time + "\n" + body);
      var ok = await crypto.subtle.verify({name: "Ed25519"}, key, line.slice(8), message);
      (ok ? out.signed : out.bad).push(ok ? name + " at " + new Date(time * 1000).toISOString() : name);
    }
    return out;
  }

  async function getJson(url) {
    var r = await fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}});
    if (!r.ok) throw new Error(url + ": HTTP " + r.status);
    return r.json();
  }

  async function run(section) {
    var results = document.getElementById("verify-results");
    var verdict = document.getElementById("verify-verdict");
    results.innerHTML = ""; verdict.textContent = "Verifying…"; verdict.className = "";
    var failed = false;
    function step(ok, text) {
      var li = document.createElement("li");
      li.className = ok ? "pass" : "fail";
      li.textContent = (ok ? "PASS: " : "FAIL: ") + text;
      results.appendChild(li);
      if (!ok) failed = true;
    }
    var index = Number(section.dataset.index);
    var keyInput = document.getElementById("log-key");
    try {
      var publicKey = b64decode(keyInput.value.trim());
      var name = keyInput.dataset.name, origin = keyInput.dataset.origin;
      var current = await verifyCheckpoint((await getJson("/console/log/checkpoint")).checkpoint,
                                           name, publicKey, origin);
      step(true, "checkpoint of size " + current.size + " is signed by the pinned log key (Ed25519)");
      var witnesses = JSON.parse(section.dataset.witnesses || "[]");
      var quorum = Number(section.dataset.quorum || "0");
      if (witnesses.length) {
        var co = await verifyCosignatures(current.note, witnesses);
        step(co.bad.length === 0 && co.signed.length >= quorum,
             co.signed.length + " of " + witnesses.length + " pinned witnesses cosigned (quorum " + quorum +
             ")" + (co.signed.length ? ": " + co.signed.join(", ") : "") +
             (co.missing.length ? "; missing: " + co.missing.join(", ") : "") +
             (co.bad.length ? "; INVALID: " + co.bad.join(", ") : ""));
      } else {
        step(true, "no witnesses are pinned: the checkpoint rests on the log key alone");
      }
      var leaf = b64decode((await getJson("/console/log/" + index + "/leaf")).leaf);
      var hash = await leafHash(leaf);
      step(true, "leaf hash computed here: " + b64encode(hash));
      var inclusion = await getJson("/console/log/proof/inclusion?index=" + index + "&size=" + current.size);
      var ok = false, why = "";
      try { ok = await verifyInclusion(index, current.size, hash, inclusion.proof.map(b64decode), current.root); }
      catch (e) { why = " (" + e.message + ")"; }
      step(ok, "inclusion of entry " + index + " in the checkpoint's tree of " + current.size +
           (ok ? " verified against its root" : " does not lead to the checkpoint's root" + why));
      var select = document.getElementById("old-size");
      var oldSize = select && select.value && select.value !== "auto" ? Number(select.value) : 0;
      if (select && select.value === "auto") {
        // the coordinator checkpoints by itself, so the newest stored checkpoint is often the current
        // one; a consistency check needs an earlier one
        Array.prototype.forEach.call(select.options, function (option) {
          var size = Number(option.value);
          if (option.value !== "auto" && size < current.size && size > oldSize) { oldSize = size; }
        });
      }
      if (oldSize > 0 && oldSize <= current.size) {
        var old = await verifyCheckpoint((await getJson("/console/log/checkpoints/" + oldSize)).checkpoint,
                                         name, publicKey, origin);
        step(true, "earlier checkpoint of size " + old.size + " is signed by the pinned log key");
        var consistency = await getJson("/console/log/proof/consistency?old_size=" + old.size +
                                        "&new_size=" + current.size);
        var consistent = await verifyConsistency(old.size, current.size, old.root, current.root,
                                                 consistency.proof.map(b64decode));
        step(consistent, "the log of size " + current.size + (consistent ? " extends" : " does NOT extend") +
             " the earlier checkpoint of size " + old.size);
      }
    } catch (e) {
      step(false, e.message);
    }
    verdict.textContent = failed ? "FAILED: do not trust this entry's log." : "VERIFIED in this browser.";
    verdict.className = failed ? "bad" : "ok";
    section.dataset.verdict = failed ? "failed" : "verified";
  }

  window.hxVerify = {b64decode: b64decode, leafHash: leafHash, verifyInclusion: verifyInclusion,
                     verifyConsistency: verifyConsistency, verifyCheckpoint: verifyCheckpoint, verifyCosignatures: verifyCosignatures};
  var section = document.getElementById("verifier");
  var form = document.getElementById("verify-form");
  if (section && form) {
    form.addEventListener("submit", function (event) { event.preventDefault(); run(section); });
  }
})();
