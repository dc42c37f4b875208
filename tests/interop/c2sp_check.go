// c2sp_check verifies Smalti's ledger evidence with the Go project's own transparency-log code
// (golang.org/x/mod/sumdb/note and sumdb/tlog), an implementation Smalti does not share.
//
//	c2sp_check note VERIFIER_KEY CHECKPOINT_FILE
//	    open the signed note with the verifier key; print origin, size and base64 root
//	c2sp_check inclusion VERIFIER_KEY CHECKPOINT_FILE PROOF_JSON
//	    also check `smalti ledger proof` output: the entry's RFC 6962 inclusion in the checkpoint's tree
//	c2sp_check keygen NAME / c2sp_check sign SIGNER_KEY TEXT_FILE
//	    make a key pair and sign a note with Go's code, for Smalti's reader to open
package main

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) == 3 && os.Args[1] == "keygen" {
		skey, vkey, err := note.GenerateKey(rand.Reader, os.Args[2])
		if err != nil {
			fail("keygen: %v", err)
		}
		fmt.Printf("%s\n%s\n", skey, vkey)
		return
	}
	if len(os.Args) == 4 && os.Args[1] == "sign" {
		signer, err := note.NewSigner(os.Args[2])
		if err != nil {
			fail("signer key: %v", err)
		}
		text, err := os.ReadFile(os.Args[3])
		if err != nil {
			fail("%v", err)
		}
		signed, err := note.Sign(&note.Note{Text: string(text)}, signer)
		if err != nil {
			fail("sign: %v", err)
		}
		os.Stdout.Write(signed)
		return
	}
	if len(os.Args) < 4 {
		fail("usage: c2sp_check note|inclusion VERIFIER_KEY CHECKPOINT_FILE [PROOF_JSON] | keygen NAME | sign SKEY TEXT")
	}
	verifier, err := note.NewVerifier(os.Args[2])
	if err != nil {
		fail("verifier key: %v", err)
	}
	signed, err := os.ReadFile(os.Args[3])
	if err != nil {
		fail("%v", err)
	}
	opened, err := note.Open(signed, note.VerifierList(verifier))
	if err != nil {
		fail("note: %v", err)
	}
	lines := strings.Split(opened.Text, "\n")
	if len(lines) < 4 {
		fail("checkpoint: too few lines")
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		fail("checkpoint size: %v", err)
	}
	root, err := tlog.ParseHash(lines[2])
	if err != nil {
		fail("checkpoint root: %v", err)
	}
	fmt.Printf("origin %s\nsize %d\nroot %s\n", lines[0], size, lines[2])
	if os.Args[1] != "inclusion" {
		return
	}
	raw, err := os.ReadFile(os.Args[4])
	if err != nil {
		fail("%v", err)
	}
	var proof struct {
		LeafIndex int64    `json:"leaf_index"`
		TreeSize  int64    `json:"tree_size"`
		Entry     string   `json:"entry_base64"`
		AuditPath []string `json:"audit_path"`
	}
	if err := json.Unmarshal(raw, &proof); err != nil {
		fail("proof: %v", err)
	}
	if proof.TreeSize != size {
		fail("proof is for tree size %d, the checkpoint for %d", proof.TreeSize, size)
	}
	entry, err := base64.StdEncoding.DecodeString(proof.Entry)
	if err != nil {
		fail("entry: %v", err)
	}
	var path tlog.RecordProof
	for _, step := range proof.AuditPath {
		b, err := hex.DecodeString(step)
		if err != nil || len(b) != tlog.HashSize {
			fail("audit path: bad hash %q", step)
		}
		var h tlog.Hash
		copy(h[:], b)
		path = append(path, h)
	}
	if err := tlog.CheckRecord(path, size, root, proof.LeafIndex, tlog.RecordHash(entry)); err != nil {
		fail("inclusion: %v", err)
	}
	fmt.Printf("entry %d included\n", proof.LeafIndex)
}
