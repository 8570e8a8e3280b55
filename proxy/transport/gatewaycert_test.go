package transport

import (
	"crypto"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// A gateway without --tls-cert keeps one certificate in its state
// directory, so that the fingerprint clients pin survives restarts
// (issue 8, item 3): made once (0600 in 0700), read back unchanged, the
// same for gateways starting at once, never replaced when corrupt, and
// refused where other users could read the key or swap the file.
func TestGatewayCertPersistsAndIsNeverReplaced(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "state")
	id, err := LoadOrCreateGatewayCert(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !id.Created || id.Path != filepath.Join(dir, GatewayCertFile) || id.Fingerprint != CertFingerprint(id.Certificate.Leaf.Raw) {
		t.Fatalf("first call: %+v", id)
	}
	for path, want := range map[string]os.FileMode{dir: 0o700, id.Path: 0o600} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s: mode %04o, want %04o", path, st.Mode().Perm(), want)
		}
	}
	again, err := LoadOrCreateGatewayCert(dir)
	if err != nil {
		t.Fatal(err)
	}
	if again.Created || again.Fingerprint != id.Fingerprint {
		t.Fatalf("second call: created %v, fingerprint %s, want %s", again.Created, again.Fingerprint, id.Fingerprint)
	}
	if _, ok := again.ServerTLS().Certificates[0].PrivateKey.(crypto.Signer); !ok {
		t.Fatal("no private key loaded")
	}

	t.Run("concurrent_first_start", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "state")
		const n = 8
		fps := make([]string, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				id, err := LoadOrCreateGatewayCert(dir)
				if err != nil {
					t.Error(err)
					return
				}
				fps[i] = id.Fingerprint
			})
		}
		wg.Wait()
		for i := range fps {
			if fps[i] != fps[0] {
				t.Fatalf("gateways starting at once got different certificates: %v", fps)
			}
		}
		entries, _ := os.ReadDir(dir)
		if len(entries) != 1 || entries[0].Name() != GatewayCertFile {
			t.Fatalf("state directory holds %v, want only %s", entries, GatewayCertFile)
		}
	})

	t.Run("corrupt", func(t *testing.T) {
		dir := t.TempDir()
		os.Chmod(dir, 0o700)
		id, err := LoadOrCreateGatewayCert(dir)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(id.Path)
		half := b[:len(b)/2]
		os.WriteFile(id.Path, half, 0o600)
		_, err = LoadOrCreateGatewayCert(dir)
		if err == nil || !strings.Contains(err.Error(), "corrupt") || !strings.Contains(err.Error(), id.Path) {
			t.Fatalf("truncated file: %v", err)
		}
		if now, _ := os.ReadFile(id.Path); string(now) != string(half) {
			t.Fatal("the corrupt file was replaced")
		}
	})

	t.Run("key_readable_by_others", func(t *testing.T) {
		os.Chmod(id.Path, 0o644)
		defer os.Chmod(id.Path, 0o600)
		if _, err := LoadOrCreateGatewayCert(dir); err == nil || !strings.Contains(err.Error(), "chmod 600") {
			t.Fatalf("key file 0644: %v", err)
		}
	})

	t.Run("directory_writable_by_others", func(t *testing.T) {
		os.Chmod(dir, 0o777)
		defer os.Chmod(dir, 0o700)
		if _, err := LoadOrCreateGatewayCert(dir); err == nil || !strings.Contains(err.Error(), "chmod 700") {
			t.Fatalf("directory 0777: %v", err)
		}
	})

	if _, err := LoadOrCreateGatewayCert(""); err == nil || !strings.Contains(err.Error(), "--state-dir") {
		t.Fatalf("no directory: %v", err)
	}
}
