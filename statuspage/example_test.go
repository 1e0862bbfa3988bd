package statuspage_test

// The README's status page snippet is copied from this file;
// TestREADMESnippetsAreExamples (readme_test.go, at the root) fails when
// they differ.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/redis/rueidis"
	"go.uber.org/zap"

	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/producer"
	"github.com/batchq/batchq/statuspage"
)

// mountStatusPage mounts the status page of the queues under the default
// prefix at /batchq/ on mux, a service's admin mux: guard it like the
// service's other admin endpoints, since the page has no login of its own.
func mountStatusPage(mux *http.ServeMux, rdb rueidis.Client, log *zap.Logger) error {
	in, err := inspect.New(rdb) // the default prefix; inspect.WithPrefix sets another
	if err != nil {
		return err
	}
	page, err := statuspage.New(in, statuspage.WithLogger(log))
	if err != nil {
		return err
	}
	mux.Handle("/batchq/", http.StripPrefix("/batchq", page))
	return nil
}

// The status page lists every queue with its depth, and links to its
// page.
func Example() {
	rdb, err := embedded.Start() // in production: your own rueidis.Client
	if err != nil {
		panic(err)
	}
	defer rdb.Close()
	p, err := producer.New(rdb.Client)
	if err != nil {
		panic(err)
	}
	if err := p.Add(context.Background(), "emails", "user:42", map[string]string{"to": "a@example.com"}); err != nil {
		panic(err)
	}

	mux := http.NewServeMux()
	if err := mountStatusPage(mux, rdb.Client, zap.NewNop()); err != nil {
		panic(err)
	}
	srv := httptest.NewServer(mux) // in production: your admin server
	defer srv.Close()
	res, err := http.Get(srv.URL + "/batchq/")
	if err != nil {
		panic(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		panic(err)
	}
	fmt.Println(res.Status, res.Header.Get("Content-Type"))
	fmt.Println(strings.Contains(string(body), `<a href="queues/emails" data-stat="link">emails</a>`))
	// Output:
	// 200 OK text/html; charset=utf-8
	// true
}
