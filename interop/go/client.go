package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/dynamicpb"
)

const (
	methodSubscribe    = "/" + serviceName + "/Subscribe"
	methodPublish      = "/" + serviceName + "/Publish"
	methodGetBuildInfo = "/" + serviceName + "/GetBuildInfo"
)

// clientFlags are the flags every client subcommand has.
type clientFlags struct {
	fs          *flag.FlagSet
	descriptors *string
	server      *string
	timeout     *time.Duration
}

func newClientFlags(name string) *clientFlags {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	return &clientFlags{
		fs:          fs,
		descriptors: fs.String("descriptors", "", "FileDescriptorSet file with the cunicu protobuf files"),
		server:      fs.String("server", "", "signaling server HOST:PORT (plaintext HTTP/2)"),
		timeout:     fs.Duration("timeout", 2*time.Minute, "give up after this long"),
	}
}

// setup parses the flags, loads the schema and connects (lazily, as grpc-go does).
func (c *clientFlags) setup(args []string) (*schema, *grpc.ClientConn, context.Context, context.CancelFunc, error) {
	if err := c.fs.Parse(args); err != nil {
		return nil, nil, nil, nil, err
	}
	if c.fs.NArg() > 0 {
		return nil, nil, nil, nil, fmt.Errorf("unexpected arguments: %q", c.fs.Args())
	}
	s, err := loadSchema(*c.descriptors)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	if *c.server == "" {
		return nil, nil, nil, nil, errors.New("--server HOST:PORT is required")
	}
	conn, err := grpc.NewClient("passthrough:///"+*c.server,
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *c.timeout)
	return s, conn, ctx, cancel, nil
}

// subscribe opens a Subscribe stream for key and waits for the empty sync envelope.
func subscribe(ctx context.Context, s *schema, conn *grpc.ClientConn, key []byte) (grpc.ClientStream, error) {
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{StreamName: "Subscribe", ServerStreams: true}, methodSubscribe)
	if err != nil {
		return nil, err
	}
	params := dynamicpb.NewMessage(s.subscribeParams)
	setBytes(params, "key", key)
	if err := stream.SendMsg(params); err != nil {
		return nil, err
	}
	if err := stream.CloseSend(); err != nil {
		return nil, err
	}
	sync := s.newEnvelope()
	if err := stream.RecvMsg(sync); err != nil {
		return nil, err
	}
	if size := proto.Size(sync); size != 0 {
		return nil, fmt.Errorf("first envelope of the stream is %d bytes, expected the empty sync envelope", size)
	}
	return stream, nil
}

// compactJSON turns protojson's output (whose spacing is deliberately unstable) into one line.
func compactJSON(raw []byte) (json.RawMessage, error) {
	var out bytes.Buffer
	if err := json.Compact(&out, raw); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

func printJSON(v any) error {
	line, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Printf("%s\n", line)
	return err
}

// open checks and opens an envelope addressed to us (docs/PROTOCOL.md §4) with nacl/box.
func open(s *schema, env *dynamicpb.Message, private, public *[keyLen]byte) (sender []byte, msg *dynamicpb.Message, err error) {
	sender, recipient, body, nonce, _ := envelopeParts(env)
	if len(sender) != keyLen {
		return nil, nil, fmt.Errorf("sender is %d bytes", len(sender))
	}
	if !bytes.Equal(recipient, public[:]) {
		return nil, nil, fmt.Errorf("recipient %s is not our key %s", b64(recipient), b64(public[:]))
	}
	if len(nonce) != nonceLen {
		return nil, nil, fmt.Errorf("nonce is %d bytes", len(nonce))
	}
	// curve25519.X25519 refuses low-order points (all-zero output), as libsodium does;
	// nacl/box itself does not check.
	if _, err := curve25519.X25519(private[:], sender); err != nil {
		return nil, nil, fmt.Errorf("sender %s: %w", b64(sender), err)
	}
	var senderKey [keyLen]byte
	copy(senderKey[:], sender)
	var n [nonceLen]byte
	copy(n[:], nonce)
	plain, ok := box.Open(nil, body, &n, &senderKey, private)
	if !ok {
		return nil, nil, errors.New("box does not open")
	}
	msg = s.newMessage()
	if err := proto.Unmarshal(plain, msg); err != nil {
		return nil, nil, fmt.Errorf("plaintext is not a cunicu.signaling.Message: %w", err)
	}
	return sender, msg, nil
}

func cmdSubscribe(args []string) error {
	c := newClientFlags("subscribe")
	keyFile := c.fs.String("key-file", "", "file with our private key (base64, as `wg genkey` prints it)")
	count := c.fs.Int("count", 1, "exit after this many messages")
	s, conn, ctx, cancel, err := c.setup(args)
	if err != nil {
		return err
	}
	defer cancel()
	defer conn.Close()
	private, err := readKeyFile(*keyFile)
	if err != nil {
		return err
	}
	public := publicKey(private)

	stream, err := subscribe(ctx, s, conn, public[:])
	if err != nil {
		return err
	}
	fmt.Println("READY")
	for got := 0; got < *count; {
		env := s.newEnvelope()
		if err := stream.RecvMsg(env); err != nil {
			return err
		}
		sender, msg, err := open(s, env, private, public)
		if err != nil {
			// Like every backend (docs/PROTOCOL.md §6): drop it with a log line, deliver nothing.
			fmt.Fprintf(os.Stderr, "interop: envelope dropped: %v\n", err)
			continue
		}
		raw, err := protojson.Marshal(msg)
		if err != nil {
			return err
		}
		message, err := compactJSON(raw)
		if err != nil {
			return err
		}
		if err := printJSON(struct {
			Sender    string          `json:"sender"`
			Recipient string          `json:"recipient"`
			Message   json.RawMessage `json:"message"`
		}{b64(sender), b64(public[:]), message}); err != nil {
			return err
		}
		got++
	}
	return nil
}

func cmdPublish(args []string) error {
	c := newClientFlags("publish")
	keyFile := c.fs.String("key-file", "", "file with our private key (base64)")
	to := c.fs.String("to", "", "recipient's public key (base64)")
	jsonText := c.fs.String("json", "", "the cunicu.signaling.Message in proto3 JSON")
	s, conn, ctx, cancel, err := c.setup(args)
	if err != nil {
		return err
	}
	defer cancel()
	defer conn.Close()
	private, err := readKeyFile(*keyFile)
	if err != nil {
		return err
	}
	recipient, err := parseKey(*to)
	if err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	if _, err := curve25519.X25519(private[:], recipient[:]); err != nil {
		return fmt.Errorf("--to: %w", err)
	}
	msg := s.newMessage()
	if err := protojson.Unmarshal([]byte(*jsonText), msg); err != nil {
		return fmt.Errorf("--json: %w", err)
	}
	plain, err := proto.Marshal(msg)
	if err != nil {
		return err
	}
	var nonce [nonceLen]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return err
	}
	// nacl/box.Seal: the 16-byte Poly1305 tag, then the ciphertext (docs/PROTOCOL.md §4).
	body := box.Seal(nil, plain, &nonce, recipient, private)
	env := s.buildEnvelope(publicKey(private)[:], recipient[:], body, nonce[:])
	if err := conn.Invoke(ctx, methodPublish, env, dynamicpb.NewMessage(s.empty)); err != nil {
		return err
	}
	fmt.Println("OK")
	return nil
}

func decodeFlag(name, text string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(text)
	if err != nil {
		return nil, fmt.Errorf("--%s: %w", name, err)
	}
	return b, nil
}

// cmdPublishRaw publishes an envelope exactly as given, without sealing anything:
// for invalid keys and other malformed envelopes.
func cmdPublishRaw(args []string) error {
	c := newClientFlags("publish-raw")
	flags := map[string]*string{}
	for _, name := range []string{"sender", "recipient", "body", "nonce"} {
		flags[name] = c.fs.String(name, "", name+" bytes (base64)")
	}
	s, conn, ctx, cancel, err := c.setup(args)
	if err != nil {
		return err
	}
	defer cancel()
	defer conn.Close()
	parts := map[string][]byte{}
	for name, text := range flags {
		if parts[name], err = decodeFlag(name, *text); err != nil {
			return err
		}
	}
	env := s.buildEnvelope(parts["sender"], parts["recipient"], parts["body"], parts["nonce"])
	if err := conn.Invoke(ctx, methodPublish, env, dynamicpb.NewMessage(s.empty)); err != nil {
		return err
	}
	fmt.Println("OK")
	return nil
}

// cmdSubscribeRaw subscribes to any bytes as key and prints the envelopes as they come,
// in proto3 JSON, without opening them.
func cmdSubscribeRaw(args []string) error {
	c := newClientFlags("subscribe-raw")
	keyText := c.fs.String("key", "", "the key to subscribe to (base64, any length)")
	count := c.fs.Int("count", 0, "exit after this many envelopes")
	s, conn, ctx, cancel, err := c.setup(args)
	if err != nil {
		return err
	}
	defer cancel()
	defer conn.Close()
	key, err := decodeFlag("key", *keyText)
	if err != nil {
		return err
	}
	stream, err := subscribe(ctx, s, conn, key)
	if err != nil {
		return err
	}
	fmt.Println("READY")
	for got := 0; got < *count; got++ {
		env := s.newEnvelope()
		if err := stream.RecvMsg(env); err != nil {
			return err
		}
		raw, err := protojson.Marshal(env)
		if err != nil {
			return err
		}
		line, err := compactJSON(raw)
		if err != nil {
			return err
		}
		fmt.Printf("%s\n", line)
	}
	return nil
}

// cmdBuildInfo calls GetBuildInfo and prints the answer in proto3 JSON.
func cmdBuildInfo(args []string) error {
	c := newClientFlags("build-info")
	s, conn, ctx, cancel, err := c.setup(args)
	if err != nil {
		return err
	}
	defer cancel()
	defer conn.Close()
	info := dynamicpb.NewMessage(s.buildInfo)
	if err := conn.Invoke(ctx, methodGetBuildInfo, dynamicpb.NewMessage(s.empty), info); err != nil {
		return err
	}
	raw, err := protojson.Marshal(info)
	if err != nil {
		return err
	}
	line, err := compactJSON(raw)
	if err != nil {
		return err
	}
	fmt.Printf("%s\n", line)
	return nil
}
