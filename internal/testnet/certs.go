package testnet

import (
	"crypto/ecdsa"
	"crypto/x509"
	"testing"

	"github.com/lifeline-proxy/lifeline/internal/testcert"
)

// Certificates for TLS tests (see package testcert), failing the test on
// error.

// WriteCA writes a self-signed CA certificate to dir/name.pem and returns
// it, its key and the file.
func WriteCA(t testing.TB, dir, name string) (*x509.Certificate, *ecdsa.PrivateKey, string) {
	t.Helper()
	cert, key, p, err := testcert.CA(dir, name)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key, p
}

// WriteLeaf writes a certificate for loopback signed by the CA, server and
// client use, to dir/name.pem and its key to dir/name.key, and returns
// both files.
func WriteLeaf(t testing.TB, dir, name string, ca *x509.Certificate, caKey *ecdsa.PrivateKey, serial int64) (string, string) {
	t.Helper()
	cp, kp, err := testcert.Leaf(dir, name, ca, caKey, serial)
	if err != nil {
		t.Fatal(err)
	}
	return cp, kp
}
