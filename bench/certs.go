package bench

import "github.com/lifeline-proxy/lifeline/internal/testcert"

// certFiles are the PEM files of a throwaway CA, a gateway certificate
// (loopback) and a client certificate for mTLS.
type certFiles struct {
	CA, ServerCert, ServerKey, ClientCert, ClientKey string
}

func makeCerts(dir string) (*certFiles, error) {
	ca, caKey, caPath, err := testcert.CA(dir, "lifeline-bench-ca")
	if err != nil {
		return nil, err
	}
	f := &certFiles{CA: caPath}
	if f.ServerCert, f.ServerKey, err = testcert.Leaf(dir, "gateway", ca, caKey, 2); err != nil {
		return nil, err
	}
	if f.ClientCert, f.ClientKey, err = testcert.Leaf(dir, "client", ca, caKey, 3); err != nil {
		return nil, err
	}
	return f, nil
}
