// c2sp_check verifies Smalti's ledger evidence with the Go project's own transparency-log code
// (golang.org/x/mod/sumdb/note and sumdb/tlog), an implementation Smalti does not share.
//
//	c2sp_check note VERIFIER_KEY CHECKPOINT_FILE
//	    open the signed note with the verifier key; print origin, size and base64 root
//	c2sp_check inclusion VERIFIER_KEY CHECKPOINT_FILE PROOF_JSON
//	    also check `smalti ledger proof` output: the entry's RFC 6962 inclusion in the checkpoint's tree
//	c2sp_check tiles BASE_URL VERIFIER_KEY [OLD_CHECKPOINT_FILE]
//	    read a published tlog-tiles log over HTTP as a tlog client does: check the checkpoint, every
//	    entry's inclusion from the tiles, and consistency with an older checkpoint
//	c2sp_check prove-many BASE_URL VERIFIER_KEY COUNT SEED
//	    as a tlog client serving proofs: COUNT inclusion proofs of entries chosen at random (seeded), each
//	    proved from the tiles (fetched over HTTP once, authenticated, then kept as a client keeps them) and
//	    checked against the entry's bytes and the signed checkpoint; prints one JSON line with the rate
//	c2sp_check keygen NAME / c2sp_check sign SIGNER_KEY TEXT_FILE
//	    make a key pair and sign a note with Go's code, for Smalti's reader to open
package main

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	mathrand "math/rand"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

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
	if len(os.Args) == 6 && os.Args[1] == "prove-many" {
		count, err1 := strconv.Atoi(os.Args[4])
		seed, err2 := strconv.ParseInt(os.Args[5], 10, 64)
		if err1 != nil || err2 != nil || count < 1 {
			fail("usage: c2sp_check prove-many BASE_URL VERIFIER_KEY COUNT SEED")
		}
		proveMany(os.Args[2], os.Args[3], count, seed)
		return
	}
	if len(os.Args) >= 4 && os.Args[1] == "tiles" {
		checkTiles(os.Args[2], os.Args[3], os.Args[4:])
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
	tree, origin := openCheckpoint(signed, verifier)
	size, root := tree.N, tree.Hash
	fmt.Printf("origin %s\nsize %d\nroot %s\n", origin, size, root)
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

// c2spTiles reads tiles at C2SP paths: Go's tlog names them tile/8/L/N (and tile/8/data/N for entries);
// C2SP drops the fixed height 8 and calls entry bundles tile/entries/N.
type c2spTiles struct{ base string }

func (r c2spTiles) Height() int { return 8 }

func (r c2spTiles) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	var out [][]byte
	for _, t := range tiles {
		path := strings.Replace(strings.Replace(t.Path(), "tile/8/data/", "tile/entries/", 1), "tile/8/", "tile/", 1)
		data, err := get(r.base + "/" + path)
		if err != nil {
			return nil, err
		}
		out = append(out, data)
	}
	return out, nil
}

func (r c2spTiles) SaveTiles(tiles []tlog.Tile, data [][]byte) {}

func get(url string) ([]byte, error) {
	response, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer response.Body.Close()
	if response.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, response.Status)
	}
	return io.ReadAll(response.Body)
}

func openCheckpoint(signed []byte, verifier note.Verifier) (tlog.Tree, string) {
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
	return tlog.Tree{N: size, Hash: root}, lines[0]
}

func checkTiles(base string, vkey string, older []string) {
	verifier, err := note.NewVerifier(vkey)
	if err != nil {
		fail("verifier key: %v", err)
	}
	signed, err := get(base + "/checkpoint")
	if err != nil {
		fail("%v", err)
	}
	tree, origin := openCheckpoint(signed, verifier)
	reader := tlog.TileHashReader(tree, c2spTiles{base})
	for i := int64(0); i < tree.N; i++ {
		proof, err := tlog.ProveRecord(tree.N, i, reader)
		if err != nil {
			fail("prove entry %d: %v", i, err)
		}
		bundle := tlog.Tile{H: 8, L: -1, N: i / 256, W: 256}
		if rest := tree.N - bundle.N*256; rest < 256 {
			bundle.W = int(rest)
		}
		data, err := c2spTiles{base}.ReadTiles([]tlog.Tile{bundle})
		if err != nil {
			fail("entries: %v", err)
		}
		entry := data[0]
		for skip := i % 256; ; skip-- {
			if len(entry) < 2 {
				fail("bundle %d: truncated", bundle.N)
			}
			length := int(entry[0])<<8 | int(entry[1])
			if skip == 0 {
				entry = entry[2 : 2+length]
				break
			}
			entry = entry[2+length:]
		}
		if err := tlog.CheckRecord(proof, tree.N, tree.Hash, i, tlog.RecordHash(entry)); err != nil {
			fail("entry %d: %v", i, err)
		}
	}
	fmt.Printf("origin %s\nsize %d\nall %d entries included\n", origin, tree.N, tree.N)
	if len(older) == 1 {
		previous, err := os.ReadFile(older[0])
		if err != nil {
			fail("%v", err)
		}
		old, _ := openCheckpoint(previous, verifier)
		proof, err := tlog.ProveTree(tree.N, old.N, reader)
		if err != nil {
			fail("prove consistency: %v", err)
		}
		if err := tlog.CheckTree(proof, tree.N, tree.Hash, old.N, old.Hash); err != nil {
			fail("consistency with size %d: %v", old.N, err)
		}
		fmt.Printf("consistent with size %d\n", old.N)
	}
}

// cachedTiles is c2spTiles with the memory a real client has: tlog hands SaveTiles only tiles it has
// authenticated against the checkpoint, and ReadTiles answers from them before going to the network.
type cachedTiles struct {
	c2spTiles
	kept    map[string][]byte
	fetched int
}

func (r *cachedTiles) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(tiles))
	for i, t := range tiles {
		if data, ok := r.kept[t.Path()]; ok {
			out[i] = data
			continue
		}
		data, err := r.c2spTiles.ReadTiles([]tlog.Tile{t})
		if err != nil {
			return nil, err
		}
		r.fetched++
		out[i] = data[0]
	}
	return out, nil
}

func (r *cachedTiles) SaveTiles(tiles []tlog.Tile, data [][]byte) {
	for i, t := range tiles {
		r.kept[t.Path()] = data[i]
	}
}

// entryAt is entry i of a bundle of entries (each a two-byte big-endian length and the bytes).
func entryAt(bundle []byte, skip int64) []byte {
	for ; ; skip-- {
		if len(bundle) < 2 {
			fail("entry bundle truncated")
		}
		length := int(bundle[0])<<8 | int(bundle[1])
		if 2+length > len(bundle) {
			fail("entry bundle truncated")
		}
		if skip == 0 {
			return bundle[2 : 2+length]
		}
		bundle = bundle[2+length:]
	}
}

func proveMany(base string, vkey string, count int, seed int64) {
	verifier, err := note.NewVerifier(vkey)
	if err != nil {
		fail("verifier key: %v", err)
	}
	started := time.Now()
	signed, err := get(base + "/checkpoint")
	if err != nil {
		fail("%v", err)
	}
	tree, _ := openCheckpoint(signed, verifier)
	tiles := &cachedTiles{c2spTiles{base}, map[string][]byte{}, 0}
	reader := tlog.TileHashReader(tree, tiles)
	bundles := map[int64][]byte{}
	random := mathrand.New(mathrand.NewSource(seed))
	for n := 0; n < count; n++ {
		i := random.Int63n(tree.N)
		proof, err := tlog.ProveRecord(tree.N, i, reader)
		if err != nil {
			fail("prove entry %d: %v", i, err)
		}
		bundle, ok := bundles[i/256]
		if !ok {
			t := tlog.Tile{H: 8, L: -1, N: i / 256, W: 256}
			if rest := tree.N - t.N*256; rest < 256 {
				t.W = int(rest)
			}
			data, err := tiles.c2spTiles.ReadTiles([]tlog.Tile{t})
			if err != nil {
				fail("entries: %v", err)
			}
			bundle, bundles[i/256] = data[0], data[0]
			tiles.fetched++
		}
		if err := tlog.CheckRecord(proof, tree.N, tree.Hash, i, tlog.RecordHash(entryAt(bundle, i%256))); err != nil {
			fail("entry %d: %v", i, err)
		}
	}
	seconds := time.Since(started).Seconds()
	fmt.Printf("{\"proofs\": %d, \"seconds\": %.6f, \"proofs_per_s\": %.1f, \"tree_size\": %d, \"tiles_fetched\": %d}\n",
		count, seconds, float64(count)/seconds, tree.N, tiles.fetched)
}
