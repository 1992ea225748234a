package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
)

// queueDepth is how many envelopes wait per subscription stream; when it is full the
// oldest is dropped (docs/PROTOCOL.md §7).
const queueDepth = 256

// hub fans envelopes out to the subscription streams of their recipient's key.
type hub struct {
	schema *schema

	mu        sync.Mutex
	topics    map[string]map[*subscription]struct{}
	done      chan struct{}
	closed    bool
	published uint64
	delivered uint64
	dropped   uint64
}

type subscription struct {
	queue chan *dynamicpb.Message
}

// signalingServer is the handler type of the hand-written grpc.ServiceDesc.
type signalingServer interface {
	publish(env *dynamicpb.Message) (*dynamicpb.Message, error)
	subscribe(key []byte, stream grpc.ServerStream) error
	buildInfo() *dynamicpb.Message
}

func newHub(s *schema) *hub {
	return &hub{schema: s, topics: map[string]map[*subscription]struct{}{}, done: make(chan struct{})}
}

func (h *hub) add(key []byte) *subscription {
	sub := &subscription{queue: make(chan *dynamicpb.Message, queueDepth)}
	h.mu.Lock()
	defer h.mu.Unlock()
	subs := h.topics[string(key)]
	if subs == nil {
		subs = map[*subscription]struct{}{}
		h.topics[string(key)] = subs
	}
	subs[sub] = struct{}{}
	return sub
}

func (h *hub) remove(key []byte, sub *subscription) {
	h.mu.Lock()
	defer h.mu.Unlock()
	subs := h.topics[string(key)]
	delete(subs, sub)
	if len(subs) == 0 {
		delete(h.topics, string(key))
	}
}

func (h *hub) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.closed {
		h.closed = true
		close(h.done)
	}
}

func (h *hub) stats() (published, delivered, dropped uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.published, h.delivered, h.dropped
}

func (h *hub) publish(env *dynamicpb.Message) (*dynamicpb.Message, error) {
	sender, recipient, _, _, _ := envelopeParts(env)
	if len(sender) != keyLen {
		return nil, status.Errorf(codes.InvalidArgument, "sender is %d bytes, expected %d", len(sender), keyLen)
	}
	if len(recipient) != keyLen {
		return nil, status.Errorf(codes.InvalidArgument, "recipient is %d bytes, expected %d", len(recipient), keyLen)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.published++
	for sub := range h.topics[string(recipient)] {
		// Each stream gets its own copy, unchanged (unknown fields included).
		copied := proto.Clone(env).(*dynamicpb.Message)
		select {
		case sub.queue <- copied:
		default:
			// Full: drop the oldest, keep the newest.
			select {
			case <-sub.queue:
				h.dropped++
			default:
			}
			select {
			case sub.queue <- copied:
			default:
				h.dropped++
				continue
			}
		}
		h.delivered++
	}
	return dynamicpb.NewMessage(h.schema.empty), nil
}

func (h *hub) subscribe(key []byte, stream grpc.ServerStream) error {
	if len(key) != keyLen {
		return status.Errorf(codes.InvalidArgument, "key is %d bytes, expected %d", len(key), keyLen)
	}
	sub := h.add(key)
	defer h.remove(key, sub)
	// The empty sync envelope tells the client that the subscription exists.
	if err := stream.SendMsg(h.schema.newEnvelope()); err != nil {
		return err
	}
	ctx := stream.Context()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-h.done:
			return nil
		case env := <-sub.queue:
			if err := stream.SendMsg(env); err != nil {
				return err
			}
		}
	}
}

func (h *hub) buildInfo() *dynamicpb.Message {
	info := dynamicpb.NewMessage(h.schema.buildInfo)
	set := func(name, value string) {
		info.Set(field(h.schema.buildInfo, name), protoreflect.ValueOfString(value))
	}
	set("version", "interop-go")
	set("os", runtime.GOOS)
	set("arch", runtime.GOARCH)
	set("built_by", runtime.Version())
	return info
}

// serviceDesc registers cunicu.signaling.Signaling by hand: the job protoc-gen-go-grpc's
// generated code does, with dynamic messages.
func serviceDesc(s *schema) *grpc.ServiceDesc {
	unary := func(name string, newRequest func() *dynamicpb.Message, call func(signalingServer, *dynamicpb.Message) (any, error)) grpc.MethodDesc {
		return grpc.MethodDesc{
			MethodName: name,
			Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
				req := newRequest()
				if err := dec(req); err != nil {
					return nil, err
				}
				handler := func(_ context.Context, req any) (any, error) {
					return call(srv.(signalingServer), req.(*dynamicpb.Message))
				}
				if interceptor == nil {
					return handler(ctx, req)
				}
				info := &grpc.UnaryServerInfo{Server: srv, FullMethod: "/" + serviceName + "/" + name}
				return interceptor(ctx, req, info, handler)
			},
		}
	}
	return &grpc.ServiceDesc{
		ServiceName: serviceName,
		HandlerType: (*signalingServer)(nil),
		Methods: []grpc.MethodDesc{
			unary("Publish", s.newEnvelope, func(srv signalingServer, env *dynamicpb.Message) (any, error) {
				return srv.publish(env)
			}),
			unary("GetBuildInfo", func() *dynamicpb.Message { return dynamicpb.NewMessage(s.empty) },
				func(srv signalingServer, _ *dynamicpb.Message) (any, error) { return srv.buildInfo(), nil }),
		},
		Streams: []grpc.StreamDesc{{
			StreamName:    "Subscribe",
			ServerStreams: true,
			Handler: func(srv any, stream grpc.ServerStream) error {
				params := dynamicpb.NewMessage(s.subscribeParams)
				if err := stream.RecvMsg(params); err != nil {
					return err
				}
				return srv.(signalingServer).subscribe(getBytes(params, "key"), stream)
			},
		}},
		Metadata: "signaling.proto",
	}
}

func cmdServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	descriptors := fs.String("descriptors", "", "FileDescriptorSet file with the cunicu protobuf files")
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	s, err := loadSchema(*descriptors)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	h := newHub(s)
	srv := grpc.NewServer(
		// As grpc-go signaling servers like cunīcu's do: a client that pings more often
		// than every 5 minutes gets GOAWAY "too_many_pings".
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Minute}),
	)
	srv.RegisterService(serviceDesc(s), h)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	fmt.Printf("LISTENING %s\n", lis.Addr())

	select {
	case err := <-served:
		return err
	case <-signals:
	}
	// End the subscription streams, then stop; force it after 5 s.
	h.close()
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		srv.Stop()
	}
	published, delivered, dropped := h.stats()
	fmt.Printf("STOPPED published=%d delivered=%d dropped=%d\n", published, delivered, dropped)
	return nil
}
