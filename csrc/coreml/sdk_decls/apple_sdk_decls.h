/* Minimal declarations of exactly the Apple SDK symbols the csrc/coreml .mm files use.
 *
 * Purpose: type-check the Objective-C++ CoreML backend on Linux, where no Apple
 * SDK exists (tests/test_coreml_syntax.py runs clang -fsyntax-only with
 * -DANEMLL_COREML_SDK_DECLS). It is never used to build real binaries: on macOS
 * the backend includes <Foundation/Foundation.h>, <CoreML/CoreML.h> and
 * <CoreVideo/CoreVideo.h> instead.
 *
 * Every declaration below is written from Apple's public headers (macOS 15 /
 * iOS 18 SDK: Foundation, the CoreML.framework headers, CoreVideo/CVPixelBuffer.h,
 * CVReturn.h, CVBase.h) and the Core ML documentation: same selectors, parameter
 * and return types, nullability and availability annotations. Only what the
 * backend calls is declared, so a call the real SDK lacks fails here too, and a
 * new call needs a new, checked declaration here.
 *
 * Availability macros keep Apple's spelling but expand to nothing: on a Linux
 * target clang has no macOS deployment target to check them against. The macOS
 * run of the same test compiles against the real SDK with
 * -mmacosx-version-min=13.0 -Werror=unguarded-availability(-new), which checks
 * every @available guard.
 *
 * SDK variants. `@available` is a run-time check only: a symbol the SDK lacks
 * fails the build whatever the guard. ANEMLL_SDK_DECLS_MACOS picks the SDK
 * these declarations stand for (default 150000, the macOS 15 SDK):
 *   140400  the macOS 14.4 SDK (Xcode 15.3): no MLState, newState, usingState:,
 *           functionName, stateDescriptionsByName, MLStateConstraint;
 *   140000  the macOS 14.0 SDK as well without MLComputePlan / MLModelStructure
 *           and the completion-handler compile.
 * The header then defines ANEMLL_SDK_DECLS_HAVE_MLSTATE and
 * ANEMLL_SDK_DECLS_HAVE_COMPUTE_PLAN (0 or 1), which the backend uses where a
 * real SDK answers __has_include(<CoreML/MLState.h>) and
 * __has_include(<CoreML/MLComputePlan.h>).
 */
#ifndef ANEMLL_FAST_APPLE_SDK_DECLS_H
#define ANEMLL_FAST_APPLE_SDK_DECLS_H

#ifndef ANEMLL_SDK_DECLS_MACOS
#define ANEMLL_SDK_DECLS_MACOS 150000
#endif
#if ANEMLL_SDK_DECLS_MACOS >= 150000
#define ANEMLL_SDK_DECLS_HAVE_MLSTATE 1
#else
#define ANEMLL_SDK_DECLS_HAVE_MLSTATE 0
#endif
#if ANEMLL_SDK_DECLS_MACOS >= 140400
#define ANEMLL_SDK_DECLS_HAVE_COMPUTE_PLAN 1
#else
#define ANEMLL_SDK_DECLS_HAVE_COMPUTE_PLAN 0
#endif

#if defined(__APPLE__)
#error "apple_sdk_decls.h is for syntax checks off Apple platforms; include the real SDK headers on macOS"
#endif

#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------ annotations */
#define API_AVAILABLE(...)
#define API_UNAVAILABLE(...)
#define API_DEPRECATED(...)
#define API_DEPRECATED_WITH_REPLACEMENT(...)
#define API_TO_BE_DEPRECATED 100000
#define __OSX_AVAILABLE_STARTING(mac, ios)
#define NS_ASSUME_NONNULL_BEGIN _Pragma("clang assume_nonnull begin")
#define NS_ASSUME_NONNULL_END _Pragma("clang assume_nonnull end")
#define NS_REFINED_FOR_SWIFT
#define NS_SWIFT_NAME(name)
#define NS_SWIFT_ASYNC_NAME(name)
#define NS_SWIFT_DISABLE_ASYNC
#define NS_SWIFT_SENDABLE
#define NS_RETURNS_INNER_POINTER __attribute__((objc_returns_inner_pointer))
#define NS_NOESCAPE __attribute__((noescape))
#define NS_UNAVAILABLE __attribute__((unavailable))
#define NS_FORMAT_FUNCTION(F, A)
#define NS_ENUM(_type, _name) enum _name : _type _name; enum _name : _type
#define NS_OPTIONS(_type, _name) enum _name : _type _name; enum _name : _type
#define CF_OPTIONS(_type, _name) enum _name : _type _name; enum _name : _type
#define NS_STRING_ENUM
#define FOUNDATION_EXPORT extern "C"
#define ML_EXPORT extern __attribute__((visibility("default")))
#define CV_EXPORT extern "C"
#define CV_NULLABLE _Nullable
#define CV_NONNULL _Nonnull
#define CV_RETURNS_RETAINED_PARAMETER
#define CV_RELEASES_ARGUMENT
#define __WATCHOS_UNAVAILABLE

/* ------------------------------------------------------ MacTypes / objc.h */
/* arm64 macOS (the only Core ML target we build for): BOOL is bool. */
typedef bool BOOL;
#define YES true
#define NO false
typedef long NSInteger;
typedef unsigned long NSUInteger;
typedef unsigned int UInt32;
typedef UInt32 FourCharCode;
typedef FourCharCode OSType;
typedef unsigned char Boolean;
#define nil nullptr /* objc.h: __DARWIN_NULL, nullptr in C++11 */

/* ------------------------------------------------- dispatch (object.h etc.) */
/* Under ARC dispatch objects are Objective-C objects (OS_OBJECT_USE_OBJC). */
typedef uint64_t dispatch_time_t;
#define DISPATCH_TIME_NOW (0ull)
#define DISPATCH_TIME_FOREVER (~0ull)
#define NSEC_PER_SEC 1000000000ull

/* --------------------------------------------------------- CoreFoundation */
typedef const struct __CFAllocator* CFAllocatorRef;
typedef const struct __CFString* CFStringRef;
typedef const struct __CFDictionary* CFDictionaryRef;
typedef const void* CFTypeRef;
NS_ASSUME_NONNULL_BEGIN
extern "C" const CFAllocatorRef kCFAllocatorDefault; /* CFBase.h (its value is NULL: the default allocator) */
NS_ASSUME_NONNULL_END

/* ------------------------------------------------------------- Foundation */
NS_ASSUME_NONNULL_BEGIN

@class NSString;

@protocol NSObject
- (BOOL)isEqual:(id)object;
- (BOOL)isKindOfClass:(Class)aClass;
- (BOOL)respondsToSelector:(SEL)aSelector;
@end

@protocol NSCopying
- (id)copyWithZone:(struct _NSZone* _Nullable)zone;
@end

@protocol NSSecureCoding
@end

@protocol NSFastEnumeration
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject> {
  Class isa;
}
+ (instancetype)alloc;
+ (instancetype)new;
+ (Class)class;
- (instancetype)init;
@end

/* NSKeyValueCoding.h */
@interface NSObject (NSKeyValueCoding)
- (nullable id)valueForKey:(NSString*)key;
@end

@interface NSString : NSObject <NSCopying, NSSecureCoding>
@property (readonly) NSUInteger length;
@property (nullable, readonly) const char* UTF8String NS_RETURNS_INNER_POINTER;
+ (nullable instancetype)stringWithUTF8String:(const char*)nullTerminatedCString;
- (BOOL)isEqualToString:(NSString*)aString;
@end

@interface NSNumber : NSObject <NSCopying, NSSecureCoding>
@property (readonly) long long longLongValue;
@property (readonly) NSInteger integerValue;
+ (NSNumber*)numberWithInt:(int)value;
+ (NSNumber*)numberWithLongLong:(long long)value;
+ (NSNumber*)numberWithInteger:(NSInteger)value;
@end

@interface NSArray<__covariant ObjectType> : NSObject <NSCopying, NSSecureCoding, NSFastEnumeration>
@property (readonly) NSUInteger count;
- (ObjectType)objectAtIndex:(NSUInteger)index;
+ (instancetype)arrayWithObjects:(const ObjectType _Nonnull[_Nonnull])objects count:(NSUInteger)cnt;
- (ObjectType)objectAtIndexedSubscript:(NSUInteger)idx;
@end

@interface NSDictionary<__covariant KeyType, __covariant ObjectType> : NSObject <NSCopying, NSSecureCoding, NSFastEnumeration>
@property (readonly) NSUInteger count;
@property (readonly, copy) NSArray<KeyType>* allKeys;
- (nullable ObjectType)objectForKey:(KeyType)aKey;
- (nullable ObjectType)objectForKeyedSubscript:(KeyType)key;
+ (instancetype)dictionaryWithObjects:(const ObjectType _Nonnull[_Nullable])objects
                              forKeys:(const KeyType<NSCopying> _Nonnull[_Nullable])keys
                                count:(NSUInteger)cnt;
@end

@interface NSSet<__covariant ObjectType> : NSObject <NSCopying, NSSecureCoding, NSFastEnumeration>
@property (readonly) NSUInteger count;
@end

@interface NSMutableDictionary<KeyType, ObjectType> : NSDictionary<KeyType, ObjectType>
+ (instancetype)dictionaryWithCapacity:(NSUInteger)numItems;
- (void)setObject:(ObjectType)anObject forKey:(KeyType<NSCopying>)aKey;
@end

@interface NSURL : NSObject <NSSecureCoding, NSCopying>
+ (NSURL*)fileURLWithPath:(NSString*)path isDirectory:(BOOL)isDir API_AVAILABLE(macos(10.5), ios(2.0), watchos(2.0), tvos(9.0));
@property (nullable, readonly, copy) NSString* path;
@end

typedef NSString* NSErrorDomain;

@interface NSError : NSObject <NSCopying, NSSecureCoding>
@property (readonly, copy) NSErrorDomain domain;
@property (readonly) NSInteger code;
@property (readonly, copy) NSString* localizedDescription;
@end

typedef NSString* NSExceptionName NS_STRING_ENUM;

@interface NSException : NSObject <NSCopying, NSSecureCoding>
@property (readonly, copy) NSExceptionName name;
@property (nullable, readonly, copy) NSString* reason;
@end

FOUNDATION_EXPORT SEL NSSelectorFromString(NSString* aSelectorName);

@interface NSProcessInfo : NSObject
@property (class, readonly, strong) NSProcessInfo* processInfo;
@property (readonly, copy) NSString* operatingSystemVersionString;
@end

@protocol OS_dispatch_object <NSObject>
@end
@protocol OS_dispatch_semaphore <OS_dispatch_object>
@end
typedef NSObject<OS_dispatch_semaphore>* dispatch_semaphore_t;
extern "C" dispatch_semaphore_t dispatch_semaphore_create(intptr_t value);
extern "C" intptr_t dispatch_semaphore_wait(dispatch_semaphore_t dsema, dispatch_time_t timeout);
extern "C" intptr_t dispatch_semaphore_signal(dispatch_semaphore_t dsema);
extern "C" dispatch_time_t dispatch_time(dispatch_time_t when, int64_t delta);

NS_ASSUME_NONNULL_END

/* ------------------------------------------------ CoreVideo (CVReturn.h etc.) */
typedef int32_t CVReturn;
enum {
  kCVReturnSuccess = 0,
};
typedef uint64_t CVOptionFlags;
typedef struct __attribute__((objc_bridge(id))) __CVBuffer* CVBufferRef;
typedef CVBufferRef CVImageBufferRef;
typedef CVImageBufferRef CVPixelBufferRef;

enum {
  kCVPixelFormatType_OneComponent16Half = 'L00h', /* 16 bit one component IEEE half-precision float */
};

typedef CF_OPTIONS(CVOptionFlags, CVPixelBufferLockFlags){
    kCVPixelBufferLock_ReadOnly = 0x00000001,
};

CV_EXPORT const CFStringRef CV_NONNULL kCVPixelBufferIOSurfacePropertiesKey API_AVAILABLE(macosx(10.4), ios(4.0), tvos(9.0), watchos(4.0));

CV_EXPORT void CVPixelBufferRelease(CV_RELEASES_ARGUMENT CVPixelBufferRef CV_NULLABLE texture)
    API_AVAILABLE(macosx(10.4), ios(4.0), tvos(9.0), watchos(4.0));

CV_EXPORT CVReturn CVPixelBufferCreate(CFAllocatorRef CV_NULLABLE allocator, size_t width, size_t height,
                                       OSType pixelFormatType, CFDictionaryRef CV_NULLABLE pixelBufferAttributes,
                                       CV_RETURNS_RETAINED_PARAMETER CVPixelBufferRef CV_NULLABLE* CV_NONNULL
                                           pixelBufferOut)
    API_AVAILABLE(macosx(10.4), ios(4.0), tvos(9.0), watchos(4.0));

CV_EXPORT CVReturn CVPixelBufferLockBaseAddress(CVPixelBufferRef CV_NONNULL pixelBuffer,
                                                CVPixelBufferLockFlags lockFlags)
    API_AVAILABLE(macosx(10.4), ios(4.0), tvos(9.0), watchos(4.0));

CV_EXPORT CVReturn CVPixelBufferUnlockBaseAddress(CVPixelBufferRef CV_NONNULL pixelBuffer,
                                                  CVPixelBufferLockFlags unlockFlags)
    API_AVAILABLE(macosx(10.4), ios(4.0), tvos(9.0), watchos(4.0));

CV_EXPORT size_t CVPixelBufferGetWidth(CVPixelBufferRef CV_NONNULL pixelBuffer)
    API_AVAILABLE(macosx(10.4), ios(4.0), tvos(9.0), watchos(4.0));

CV_EXPORT size_t CVPixelBufferGetHeight(CVPixelBufferRef CV_NONNULL pixelBuffer)
    API_AVAILABLE(macosx(10.4), ios(4.0), tvos(9.0), watchos(4.0));

CV_EXPORT void* CV_NULLABLE CVPixelBufferGetBaseAddress(CVPixelBufferRef CV_NONNULL pixelBuffer)
    API_AVAILABLE(macosx(10.4), ios(4.0), tvos(9.0), watchos(4.0));

CV_EXPORT size_t CVPixelBufferGetBytesPerRow(CVPixelBufferRef CV_NONNULL pixelBuffer)
    API_AVAILABLE(macosx(10.4), ios(4.0), tvos(9.0), watchos(4.0));

/* ------------------------------------------------------------------ CoreML */
NS_ASSUME_NONNULL_BEGIN

/* MLFeatureType.h */
typedef NS_ENUM(NSInteger, MLFeatureType){
    MLFeatureTypeInvalid = 0,
    MLFeatureTypeInt64 = 1,
    MLFeatureTypeDouble = 2,
    MLFeatureTypeString = 3,
    MLFeatureTypeImage = 4,
    MLFeatureTypeMultiArray = 5,
    MLFeatureTypeDictionary = 6,
    MLFeatureTypeSequence API_AVAILABLE(macos(10.14), ios(12.0), watchos(5.0), tvos(12.0)) = 7,
#if ANEMLL_SDK_DECLS_HAVE_MLSTATE
    MLFeatureTypeState API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0)) = 8,
#endif
} API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0));

/* MLMultiArray.h */
typedef NS_ENUM(NSInteger, MLMultiArrayDataType){
    MLMultiArrayDataTypeDouble = 0x10000 | 64,
    MLMultiArrayDataTypeFloat64 API_AVAILABLE(macos(11.0), ios(14.0), watchos(7.0), tvos(14.0)) = 0x10000 | 64,
    MLMultiArrayDataTypeFloat32 = 0x10000 | 32,
    MLMultiArrayDataTypeFloat16 API_AVAILABLE(macos(12.0), ios(16.0), watchos(9.0), tvos(16.0)) = 0x10000 | 16,
    MLMultiArrayDataTypeFloat API_AVAILABLE(macos(11.0), ios(14.0), watchos(7.0), tvos(14.0)) = 0x10000 | 32,
    MLMultiArrayDataTypeInt32 = 0x20000 | 32,
} API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0));

API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
ML_EXPORT
@interface MLMultiArray : NSObject <NSSecureCoding>
@property (readonly, nonatomic) MLMultiArrayDataType dataType;
@property (readonly, nonatomic) NSArray<NSNumber*>* shape;
@property (readonly, nonatomic) NSArray<NSNumber*>* strides;
@property (readonly, nonatomic) NSInteger count;
@property (readonly, nullable, nonatomic) CVPixelBufferRef pixelBuffer API_AVAILABLE(macos(12.0), ios(16.0), watchos(9.0), tvos(16.0));
@end

@interface MLMultiArray (Creation)
- (nullable instancetype)initWithDataPointer:(void*)dataPointer
                                       shape:(NSArray<NSNumber*>*)shape
                                    dataType:(MLMultiArrayDataType)dataType
                                     strides:(NSArray<NSNumber*>*)strides
                                 deallocator:(void (^_Nullable)(void* bytes))deallocator
                                       error:(NSError**)error;
- (instancetype)initWithPixelBuffer:(CVPixelBufferRef)pixelBuffer
                              shape:(NSArray<NSNumber*>*)shape API_AVAILABLE(macos(12.0), ios(16.0), watchos(9.0), tvos(16.0));
@end

@interface MLMultiArray (ScopedBufferAccess)
- (void)getBytesWithHandler:(void(NS_NOESCAPE ^)(const void* bytes, NSInteger size))handler
    API_AVAILABLE(macos(12.3), ios(15.4), watchos(8.5), tvos(15.4)) NS_REFINED_FOR_SWIFT;
- (void)getMutableBytesWithHandler:(void(NS_NOESCAPE ^)(void* mutableBytes, NSInteger size, NSArray<NSNumber*>* strides))handler
    API_AVAILABLE(macos(12.3), ios(15.4), watchos(8.5), tvos(15.4)) NS_REFINED_FOR_SWIFT;
@end

/* MLFeatureValue.h */
API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
ML_EXPORT
@interface MLFeatureValue : NSObject <NSCopying>
@property (readonly, nonatomic) MLFeatureType type;
@property (readonly, nullable, nonatomic) MLMultiArray* multiArrayValue;
+ (instancetype)featureValueWithMultiArray:(MLMultiArray*)value;
@end

/* MLFeatureProvider.h */
API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
@protocol MLFeatureProvider
@property (readonly, nonatomic) NSSet<NSString*>* featureNames;
- (nullable MLFeatureValue*)featureValueForName:(NSString*)featureName;
@end

/* MLDictionaryFeatureProvider.h */
API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
ML_EXPORT
@interface MLDictionaryFeatureProvider : NSObject <MLFeatureProvider, NSFastEnumeration, NSSecureCoding>
@property (readonly, nonatomic) NSDictionary<NSString*, MLFeatureValue*>* dictionary;
- (nullable instancetype)initWithDictionary:(NSDictionary<NSString*, id>*)dictionary error:(NSError**)error;
@end

/* MLMultiArrayConstraint.h */
API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
ML_EXPORT
@interface MLMultiArrayConstraint : NSObject <NSSecureCoding>
@property (readonly, nonatomic) NSArray<NSNumber*>* shape;
@property (readonly, nonatomic) MLMultiArrayDataType dataType;
@end

#if ANEMLL_SDK_DECLS_HAVE_MLSTATE
/* MLStateConstraint.h */
API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0))
ML_EXPORT
@interface MLStateConstraint : NSObject <NSSecureCoding>
@property (readonly, nonatomic) NSArray<NSNumber*>* bufferShape NS_REFINED_FOR_SWIFT API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0));
@property (readonly, nonatomic) MLMultiArrayDataType dataType API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0));
@end
#endif /* ANEMLL_SDK_DECLS_HAVE_MLSTATE */

/* MLFeatureDescription.h */
API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
ML_EXPORT
@interface MLFeatureDescription : NSObject <NSCopying, NSSecureCoding>
@property (readonly, nonatomic, copy) NSString* name;
@property (readonly, nonatomic) MLFeatureType type;
@property (readonly, nonatomic, getter=isOptional) BOOL optional;
- (BOOL)isAllowedValue:(MLFeatureValue*)value;
@end

API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
@interface MLFeatureDescription (MLFeatureValueConstraints)
@property (readonly, nullable, nonatomic) MLMultiArrayConstraint* multiArrayConstraint;
#if ANEMLL_SDK_DECLS_HAVE_MLSTATE
@property (readonly, nullable, nonatomic) MLStateConstraint* stateConstraint API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0));
#endif
@end

/* MLModelDescription.h */
API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
ML_EXPORT
@interface MLModelDescription : NSObject <NSSecureCoding>
@property (readonly, nonatomic) NSDictionary<NSString*, MLFeatureDescription*>* inputDescriptionsByName;
@property (readonly, nonatomic) NSDictionary<NSString*, MLFeatureDescription*>* outputDescriptionsByName;
#if ANEMLL_SDK_DECLS_HAVE_MLSTATE
@property (readonly, nonatomic) NSDictionary<NSString*, MLFeatureDescription*>* stateDescriptionsByName API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0));
#endif
@end

/* MLModelConfiguration.h */
typedef NS_ENUM(NSInteger, MLComputeUnits){
    MLComputeUnitsCPUOnly = 0,
    MLComputeUnitsCPUAndGPU = 1,
    MLComputeUnitsAll = 2,
    MLComputeUnitsCPUAndNeuralEngine API_AVAILABLE(macos(13.0), ios(16.0), watchos(9.0), tvos(16.0)) = 3
} API_AVAILABLE(macos(10.14), ios(12.0), watchos(5.0), tvos(12.0));

API_AVAILABLE(macos(10.14), ios(12.0), watchos(5.0), tvos(12.0))
ML_EXPORT
@interface MLModelConfiguration : NSObject <NSCopying, NSSecureCoding>
@property (readwrite, copy, nullable) NSString* modelDisplayName API_AVAILABLE(macos(13.0), ios(16.0), watchos(9.0), tvos(16.0));
@property (readwrite) MLComputeUnits computeUnits;
@end

#if ANEMLL_SDK_DECLS_HAVE_MLSTATE
API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0))
ML_EXPORT
@interface MLModelConfiguration (MultiFunctions)
@property (readwrite, nullable, copy, nonatomic) NSString* functionName API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0));
@end
#endif

/* MLPredictionOptions.h */
API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
ML_EXPORT
@interface MLPredictionOptions : NSObject
@property (readwrite, copy, nonatomic) NSDictionary<NSString*, id>* outputBackings API_AVAILABLE(macos(11.0), ios(16.0), watchos(9.0), tvos(16.0));
@end

#if ANEMLL_SDK_DECLS_HAVE_MLSTATE
/* MLState.h */
API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0))
ML_EXPORT NS_SWIFT_SENDABLE
__attribute__((objc_subclassing_restricted))
@interface MLState : NSObject
- (void)getMultiArrayForStateNamed:(NSString*)stateName
                           handler:(void(NS_NOESCAPE ^)(MLMultiArray* buffer))handler
    NS_REFINED_FOR_SWIFT API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0));
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end
#endif /* ANEMLL_SDK_DECLS_HAVE_MLSTATE */

/* MLModel.h */
API_AVAILABLE(macos(10.13), ios(11.0), watchos(4.0), tvos(11.0))
ML_EXPORT
@interface MLModel : NSObject
@property (readonly, nonatomic) MLModelDescription* modelDescription;
@property (readonly, nonatomic) MLModelConfiguration* configuration API_AVAILABLE(macos(10.14), ios(12.0), watchos(5.0), tvos(12.0));
+ (nullable instancetype)modelWithContentsOfURL:(NSURL*)url
                                  configuration:(MLModelConfiguration*)configuration
                                          error:(NSError* _Nullable __autoreleasing*)error
    API_AVAILABLE(macos(10.14), ios(12.0), watchos(5.0), tvos(12.0));
- (nullable id<MLFeatureProvider>)predictionFromFeatures:(id<MLFeatureProvider>)input
                                                 options:(MLPredictionOptions*)options
                                                   error:(NSError**)error;
@end

/* MLModel+MLModelCompilation.h */
@interface MLModel (MLModelCompilation)
+ (nullable NSURL*)compileModelAtURL:(NSURL*)modelURL
                               error:(NSError**)error
    API_UNAVAILABLE(watchos)
    API_DEPRECATED("Use the asynchronous interface compileModelAtURL:completionHandler:error: instead.",
                   macos(10.13, API_TO_BE_DEPRECATED), ios(11.0, API_TO_BE_DEPRECATED), tvos(11.0, API_TO_BE_DEPRECATED));
@end

#if ANEMLL_SDK_DECLS_HAVE_COMPUTE_PLAN
API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4))
@interface MLModel (MLModelCompilationAsync)
+ (void)compileModelAtURL:(NSURL*)modelURL
        completionHandler:(void (^)(NSURL* _Nullable compiledModelURL, NSError* _Nullable error))handler
    API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4));
@end
#endif

#if ANEMLL_SDK_DECLS_HAVE_MLSTATE
/* MLModel+MLState.h */
API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0))
ML_EXPORT
@interface MLModel (MLState)
- (MLState*)newState NS_REFINED_FOR_SWIFT API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0));
- (nullable id<MLFeatureProvider>)predictionFromFeatures:(id<MLFeatureProvider>)inputFeatures
                                              usingState:(MLState*)state
                                                 options:(MLPredictionOptions*)options
                                                   error:(NSError* __autoreleasing*)error
    NS_SWIFT_NAME(prediction(from:using:options:)) API_AVAILABLE(macos(15.0), ios(18.0), watchos(11.0), tvos(18.0));
@end
#endif /* ANEMLL_SDK_DECLS_HAVE_MLSTATE */

/* MLComputeDeviceProtocol.h, MLCPUComputeDevice.h, MLGPUComputeDevice.h, MLNeuralEngineComputeDevice.h (macOS 14.0) */
API_AVAILABLE(macos(14.0), ios(17.0), watchos(10.0), tvos(17.0))
@protocol MLComputeDeviceProtocol <NSObject>
@end

API_AVAILABLE(macos(14.0), ios(17.0), watchos(10.0), tvos(17.0))
ML_EXPORT NS_REFINED_FOR_SWIFT
@interface MLCPUComputeDevice : NSObject <MLComputeDeviceProtocol>
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

API_AVAILABLE(macos(14.0), ios(17.0), watchos(10.0), tvos(17.0))
ML_EXPORT NS_REFINED_FOR_SWIFT
@interface MLGPUComputeDevice : NSObject <MLComputeDeviceProtocol>
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

API_AVAILABLE(macos(14.0), ios(17.0), watchos(10.0), tvos(17.0))
ML_EXPORT NS_REFINED_FOR_SWIFT
@interface MLNeuralEngineComputeDevice : NSObject <MLComputeDeviceProtocol>
@property (readonly, nonatomic) NSInteger totalCoreCount;
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

#if ANEMLL_SDK_DECLS_HAVE_COMPUTE_PLAN
/* MLModelStructure*.h, MLComputePlan*.h (macOS 14.4) */
@class MLModelStructureProgramBlock;

API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4))
ML_EXPORT NS_SWIFT_SENDABLE NS_REFINED_FOR_SWIFT
__attribute__((objc_subclassing_restricted))
@interface MLModelStructureProgramOperation : NSObject
@property (readonly, copy, nonatomic) NSString* operatorName;
@property (readonly, copy, nonatomic) NSArray<MLModelStructureProgramBlock*>* blocks;
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4))
ML_EXPORT NS_SWIFT_SENDABLE NS_REFINED_FOR_SWIFT
__attribute__((objc_subclassing_restricted))
@interface MLModelStructureProgramBlock : NSObject
@property (readonly, copy, nonatomic) NSArray<NSString*>* outputNames;
@property (readonly, copy, nonatomic) NSArray<MLModelStructureProgramOperation*>* operations;
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4))
ML_EXPORT NS_SWIFT_SENDABLE NS_REFINED_FOR_SWIFT
__attribute__((objc_subclassing_restricted))
@interface MLModelStructureProgramFunction : NSObject
@property (readonly, strong, nonatomic) MLModelStructureProgramBlock* block;
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4))
ML_EXPORT NS_SWIFT_SENDABLE NS_REFINED_FOR_SWIFT
__attribute__((objc_subclassing_restricted))
@interface MLModelStructureProgram : NSObject
@property (readonly, copy, nonatomic) NSDictionary<NSString*, MLModelStructureProgramFunction*>* functions;
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4))
ML_EXPORT NS_SWIFT_SENDABLE NS_REFINED_FOR_SWIFT
__attribute__((objc_subclassing_restricted))
@interface MLModelStructure : NSObject
@property (readonly, strong, nonatomic, nullable) MLModelStructureProgram* program;
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4))
ML_EXPORT NS_SWIFT_SENDABLE NS_REFINED_FOR_SWIFT
__attribute__((objc_subclassing_restricted))
@interface MLComputePlanDeviceUsage : NSObject
@property (readonly, copy, nonatomic) NSArray<id<MLComputeDeviceProtocol>>* supportedComputeDevices;
@property (readonly, strong, nonatomic) id<MLComputeDeviceProtocol> preferredComputeDevice;
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4))
ML_EXPORT NS_SWIFT_SENDABLE NS_REFINED_FOR_SWIFT
__attribute__((objc_subclassing_restricted))
@interface MLComputePlanCost : NSObject
@property (readonly, assign, nonatomic) double weight;
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end

API_AVAILABLE(macos(14.4), ios(17.4), watchos(10.4), tvos(17.4))
ML_EXPORT NS_SWIFT_SENDABLE NS_REFINED_FOR_SWIFT
__attribute__((objc_subclassing_restricted))
@interface MLComputePlan : NSObject
+ (void)loadContentsOfURL:(NSURL*)url
            configuration:(MLModelConfiguration*)configuration
        completionHandler:(void (^)(MLComputePlan* _Nullable computePlan, NSError* _Nullable error))handler;
- (nullable MLComputePlanCost*)estimatedCostOfMLProgramOperation:(MLModelStructureProgramOperation*)operation;
- (nullable MLComputePlanDeviceUsage*)computeDeviceUsageForMLProgramOperation:(MLModelStructureProgramOperation*)operation;
@property (readonly, strong, nonatomic) MLModelStructure* modelStructure;
- (instancetype)init NS_UNAVAILABLE;
+ (instancetype)new NS_UNAVAILABLE;
@end
#endif /* ANEMLL_SDK_DECLS_HAVE_COMPUTE_PLAN */

NS_ASSUME_NONNULL_END

#endif /* ANEMLL_FAST_APPLE_SDK_DECLS_H */
