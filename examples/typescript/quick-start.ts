import { create, connect } from "@orchestrix/sdk";
await connect(); // NATS_URL, as `orchestrix dev` prints it
type PaymentInput = {
orderId: string;
amount: number;
userId: string;
};
const paymentFlow = create<PaymentInput>("payment-flow")
.step("reserve-stock", async (ctx) => {
console.log(`Reserving stock for order ${ctx.input.orderId}`);
}, {
compensate: async (ctx) => {
console.log(`Releasing stock for order ${ctx.input.orderId}`);
}
})
.step("process-payment", async (ctx) => {
console.log(`Processing payment of $${ctx.input.amount} for user ${ctx.input.userId}`);
if (ctx.input.amount > 1000) {
throw new Error("Payment declined: limit exceeded");
}
}, {
retries: 3,
retryDelayMs: 1000
})
.step("send-email", async (ctx) => {
console.log(`Sending confirmation email to user ${ctx.input.userId}`);
});
const successResult = await paymentFlow.run({
orderId: "order_1",
amount: 50,
userId: "user_A"
});
console.log(successResult.status); // "completed"
const failResult = await paymentFlow.run({
orderId: "order_2",
amount: 2000,
userId: "user_B"
});
console.log(failResult.status); // "failed"
console.log(successResult.durationMs);
console.log(successResult.steps.map((s) => `${s.name}: ${s.status}`));
if (failResult.status === "failed") {
const failedStep = failResult.steps.find((step) => step.status === "failed");
console.log(failedStep?.name);
console.log(failedStep?.attempts);
console.log(failedStep?.error);
}
const input: PaymentInput = { orderId: "order_3", amount: 50, userId: "user_C" }; // the quick start leaves `input` to the reader
const result = await paymentFlow.run(input, {
key: `payment:${input.orderId}`,
ttlMs: 60 * 60 * 1000
});
