# sink: host -> guest serial throughput. Parameters on the PVH command line, `KEY=N` words,
# decimal or 0x hex, defaults in brackets:
#   divisor=N  COM1 divisor latch [1 = 115200 baud]
#   lcr=N      line control, the frame [3 = 8N1; 0x1e = 7E2]
#   count=N    bytes to receive [1024]
#   polls=N    LSR reads to wait for each byte before giving up [1000000]
# Programs COM1 (FIFOs on, no interrupts), prints "READY\n", reads `count` bytes polling LSR.DR
# (bounded), checks them against the pattern 'A'..'Z' repeated, prints "GOT <n> BAD <m>\n"
# (n bytes received, m of them not the expected letter), waits for LSR.TEMT and powers off.
# resources/bench-serial.py sends the bytes after READY and times them up to the 'G'.
	.code32
	.include "common.inc"

	.set SI_CMDLINE, 24		# hvm_start_info.cmdline_paddr (u64; the low half is enough)
	.set LSR_TEMT, 0x40

	program_start
	mov start_info, %ebx
	mov SI_CMDLINE(%ebx), %edi
	mov $key_divisor, %esi
	mov $1, %eax
	call getarg
	mov %eax, divisor
	mov $key_lcr, %esi
	mov $LCR_8N1, %eax
	call getarg
	mov %eax, lcr
	mov $key_count, %esi
	mov $1024, %eax
	call getarg
	mov %eax, count
	mov $key_polls, %esi
	mov $POLL_LIMIT, %eax
	call getarg
	mov %eax, polls

	call uart_setup
	mov $msg_ready, %esi
	call puts
	xor %edi, %edi			# bytes received
	xor %ebp, %ebp			# bytes not as expected
	mov $'A', %bl			# the expected byte
1:	cmp count, %edi
	jae 5f
	mov polls, %ecx
2:	inb COM1 + UART_LSR
	test $LSR_DR, %al
	jnz 3f
	dec %ecx
	jnz 2b
	jmp 5f				# nothing came: report what did
3:	inb COM1 + UART_RBR
	cmp %bl, %al
	je 4f
	inc %ebp
4:	inc %edi
	inc %bl
	cmp $'Z', %bl
	jbe 1b
	mov $'A', %bl
	jmp 1b
5:	mov $msg_rx_got, %esi
	call puts
	mov %edi, %eax
	call putdec
	mov $msg_bad, %esi
	call puts
	mov %ebp, %eax
	call putdec
	mov $'\n', %al
	call putc
	call wait_temt
	jmp poweroff

# uart_setup: COM1 with the divisor and LCR from the command line, FIFOs on and cleared,
# DTR|RTS, no interrupts.
uart_setup:
	outb COM1 + UART_IER, 0
	outb COM1 + UART_LCR, LCR_DLAB
	mov divisor, %eax
	mov $COM1 + UART_DLL, %dx
	out %al, %dx
	mov %ah, %al
	mov $COM1 + UART_DLM, %dx
	out %al, %dx
	mov lcr, %eax
	and $0x7f, %al			# never leave DLAB set
	mov $COM1 + UART_LCR, %dx
	out %al, %dx
	outb COM1 + UART_FCR, FCR_ENABLE_CLEAR
	outb COM1 + UART_MCR, MCR_DTR_RTS
	ret

# wait_temt: poll LSR until the transmitter is empty (bounded). Clobbers eax, ecx, edx.
wait_temt:
	mov $POLL_LIMIT, %ecx
1:	inb COM1 + UART_LSR
	test $LSR_TEMT, %al
	jnz 2f
	dec %ecx
	jnz 1b
2:	ret

# getarg: edi = command line (0: none), esi = "key=" (NUL-terminated), eax = default.
# Returns in eax the number after the first word starting with the key, else the default.
# Preserves every register but eax and eflags.
getarg:
	push %ebx
	push %ecx
	push %edx
	push %esi
	push %edi
	mov %eax, %edx
	test %edi, %edi
	jz 9f
1:	movb (%edi), %al		# at a word boundary
	test %al, %al
	jz 9f
	cmp $' ', %al
	jne 2f
	inc %edi
	jmp 1b
2:	mov %esi, %ebx			# compare the key
	mov %edi, %ecx
3:	movb (%ebx), %al
	test %al, %al
	jz 5f
	cmpb (%ecx), %al
	jne 4f
	inc %ebx
	inc %ecx
	jmp 3b
4:	movb (%edi), %al		# no match: skip the word
	test %al, %al
	jz 9f
	cmp $' ', %al
	je 1b
	inc %edi
	jmp 4b
5:	mov %ecx, %esi
	call parse_num
	jc 9f
	mov %eax, %edx
9:	mov %edx, %eax
	pop %edi
	pop %esi
	pop %edx
	pop %ecx
	pop %ebx
	ret

# parse_num: the decimal or 0x-hex number at esi into eax; CF set when there is no digit.
# Clobbers esi.
parse_num:
	push %ebx
	push %ecx
	xor %eax, %eax
	xor %ecx, %ecx
	cmpb $'0', (%esi)
	jne 2f
	movb 1(%esi), %bl
	or $0x20, %bl
	cmp $'x', %bl
	jne 2f
	add $2, %esi
1:	movzbl (%esi), %ebx		# hex digits
	sub $'0', %ebx
	cmp $9, %ebx
	jbe 3f
	or $0x20, %ebx			# 'A'-'0' | 0x20 = 'a'-'0'
	sub $'a' - '0', %ebx
	cmp $5, %ebx
	ja 4f
	add $10, %ebx
3:	shl $4, %eax
	or %ebx, %eax
	inc %ecx
	inc %esi
	jmp 1b
2:	movzbl (%esi), %ebx		# decimal digits
	sub $'0', %ebx
	cmp $9, %ebx
	ja 4f
	imul $10, %eax, %eax
	add %ebx, %eax
	inc %ecx
	inc %esi
	jmp 2b
4:	cmp $1, %ecx			# CF = no digit
	pop %ecx
	pop %ebx
	ret

	.section .rodata
key_divisor:
	.asciz "divisor="
key_lcr:
	.asciz "lcr="
key_count:
	.asciz "count="
key_polls:
	.asciz "polls="
msg_ready:
	.asciz "READY\n"
msg_rx_got:
	.asciz "GOT "
msg_bad:
	.asciz " BAD "
	.data
	.balign 4
divisor:
	.long 0
lcr:
	.long 0
count:
	.long 0
polls:
	.long 0
	.text
