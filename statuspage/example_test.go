package statuspage_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"

	"go.uber.org/zap"

	"github.com/batchq/batchq/embedded"
	"github.com/batchq/batchq/inspect"
	"github.com/batchq/batchq/producer"
	"github.com/batchq/batchq/statuspage"
)

// Mount the status page under /batchq/ of a service's admin mux. Guard it
// like the service's other admin endpoints: it has no login of its own.
func Example() {
	rdb, err := embedded.Start() // in production: your own rueidis.Client
	if err != nil {
		panic(err)
	}
	defer rdb.Close()
	p, _ := producer.New(rdb.Client)
	_ = p.Add(context.Background(), "emails", "user:42", map[string]string{"to": "a@example.com"})

	in, err := inspect.New(rdb.Client, "") // the default prefix
	if err != nil {
		panic(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/batchq/", http.StripPrefix("/batchq",
		statuspage.New(in, statuspage.WithTitle("orders service"), statuspage.WithLogger(zap.NewNop()))))

	srv := httptest.NewServer(mux) // in production: your admin server
	defer srv.Close()
	res, err := http.Get(srv.URL + "/batchq/")
	if err != nil {
		panic(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	fmt.Println(res.Status, res.Header.Get("Content-Type"))
	fmt.Println(strings.Contains(string(body), `<a href="queues/emails" data-stat="link">emails</a>`))
	// Output:
	// 200 OK text/html; charset=utf-8
	// true
}
