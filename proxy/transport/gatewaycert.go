package transport

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// GatewayCertFile is the file, in the gateway's state directory, that
// holds the gateway's generated certificate and private key (PEM, both in
// one file so that it is replaced in one atomic step).
const GatewayCertFile = "gateway-tls.pem"

// GatewayIdentity is a gateway's self-signed certificate kept in its state
// directory.
type GatewayIdentity struct {
	Certificate tls.Certificate
	// Fingerprint is the SHA-256 of the certificate, the form --tls-pin
	// takes.
	Fingerprint string
	// Path is the file it was read from or written to.
	Path string
	// Created is true when this call generated it.
	Created bool
}

// ServerTLS is the gateway's TLS config serving the certificate.
func (id *GatewayIdentity) ServerTLS() *tls.Config { return ServerTLS(id.Certificate) }

// LoadOrCreateGatewayCert returns the gateway certificate kept in dir,
// generating it on first use, so that its fingerprint (what clients pin)
// is the same at every start. The directory is created with mode 0700 and
// the file written with mode 0600, through a temporary file that is
// published atomically: a crash leaves either no file or a whole one, and
// two gateways starting at once end up with the same certificate. An
// existing file that cannot be read as a certificate and its key is an
// error, never silently replaced (clients pin it); so are a directory
// that other users may write to and a key file that they may read.
func LoadOrCreateGatewayCert(dir string) (*GatewayIdentity, error) {
	if dir == "" {
		return nil, errors.New("no state directory for the gateway's generated certificate: set --state-dir (or $LIFELINE_STATE_DIR), or give --tls-cert and --tls-key")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w (set --state-dir to a writable directory, or give --tls-cert and --tls-key)", err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("state directory %s is not a directory", dir)
	}
	if st.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("state directory %s is writable by other users (mode %04o): chmod 700 it, or set --state-dir to another directory", dir, st.Mode().Perm())
	}
	path := filepath.Join(dir, GatewayCertFile)
	for attempt := 0; ; attempt++ {
		id, err := readGatewayCert(path)
		if err == nil || !errors.Is(err, fs.ErrNotExist) || attempt > 0 {
			return id, err
		}
		id, err = createGatewayCert(dir, path)
		if !errors.Is(err, fs.ErrExist) {
			return id, err
		}
		// Another gateway published one first: use it.
	}
}

func readGatewayCert(path string) (*GatewayIdentity, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s holds the gateway's private key but other users may read it (mode %04o): chmod 600 it", path, st.Mode().Perm())
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(b, b)
	if err == nil && cert.Leaf == nil {
		cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0])
	}
	if err != nil {
		return nil, fmt.Errorf("%s is corrupt (%v). It holds the gateway's generated certificate, which clients pin: restore it from a backup, or move it away to generate a new one (every client must then pin the new fingerprint)", path, err)
	}
	return &GatewayIdentity{Certificate: cert, Fingerprint: CertFingerprint(cert.Leaf.Raw), Path: path}, nil
}

// createGatewayCert generates a certificate and publishes it at path
// unless a file is there already (then an error wrapping fs.ErrExist).
func createGatewayCert(dir, path string) (*GatewayIdentity, error) {
	cert, err := SelfSignedCert()
	if err != nil {
		return nil, err
	}
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return nil, err
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]})
	data = append(data, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key})...)

	tmp, err := os.CreateTemp(dir, "."+GatewayCertFile+".*.tmp") // mode 0600
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	tmpName := tmp.Name()
	defer os.Remove(tmpName)
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("state directory: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	// A hard link publishes the whole file atomically and, unlike a
	// rename, never replaces one another gateway published meanwhile.
	// Where hard links are not supported, rename.
	if err := os.Link(tmpName, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, err
		}
		if err := os.Rename(tmpName, path); err != nil {
			return nil, fmt.Errorf("state directory: %w", err)
		}
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync() // the new directory entry survives a crash
		d.Close()
	}
	return &GatewayIdentity{Certificate: cert, Fingerprint: CertFingerprint(cert.Leaf.Raw), Path: path, Created: true}, nil
}
